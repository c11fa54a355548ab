// @ts-check
/// <reference path="./smtpmux.d.ts" />
/**
 * Domain then failover: prefer the downstreams tagged for the recipient's domain, fail over to all the
 * others, and stop early when the message itself is refused. Drives ctx.send() directly.
 *
 * The downstreams tagged `domain:<first recipient's domain>` are tried first, then every other downstream,
 * each group in config order, until one accepts. A temporary failure (4xx, connection refused, timeout)
 * or a downstream's own login problem (530/535, EAUTH) moves on to the next one. A permanent refusal of
 * the message (any other 5xx: unknown recipient, rejected content, ...) ends the run at once: another
 * downstream would refuse it too, and trying would only spread the same message around. When nothing
 * accepted, the deciding SendError is rethrown and the host answers the client from the attempts.
 *
 * Configure:   selector: domain-then-failover.js
 *              downstreams:
 *                - { name: corp,   addr: "mx.corp.example:25",     tags: ["domain:corp.example"] }
 *                - { name: relay,  addr: "smtp.relay.example:587" }
 *                - { name: backup, addr: "smtp.backup.example:587" }
 * `limits.max_sends` (default 5) caps how many downstreams are tried.
 */

/** Reply codes that are about the downstream's login, not the message: worth trying another downstream. */
const AUTH_CODES = [530, 535];

/**
 * @param {SendError} err
 * @returns {boolean} true when the downstream refused this message for good
 */
function refusesMessage(err) {
  const code = err.responseCode;
  if (code === undefined || code < 500 || code > 599) return false;
  return !AUTH_CODES.includes(code) && err.code !== 'EAUTH';
}

/**
 * @param {Message} message
 * @param {readonly Downstream[]} downstreams
 * @param {Ctx} ctx this message's send(), log() and state
 * @returns {Promise<SelectResult>}
 */
async function select(message, downstreams, ctx) {
  if (downstreams.length === 0) return 'no downstream is configured';
  const first = (message.to[0] ?? '').trim().replace(/^<|>$/g, '');
  const domain = first.slice(first.lastIndexOf('@') + 1).toLowerCase();
  /** @param {Downstream} ds */
  const preferred = (ds) => first.includes('@') && ds.tags.some((tag) => tag.toLowerCase() === `domain:${domain}`);
  const order = [...downstreams.filter(preferred), ...downstreams.filter((ds) => !preferred(ds))];

  /** @type {SendError | undefined} */
  let last;
  for (const ds of order) {
    try {
      await ctx.send(ds);
      return undefined; // delivered
    } catch (err) {
      if (!(err instanceof SendError)) throw err; // a bug, not a delivery failure
      if (err.code === 'SMTPMUX_SEND_LIMIT') break;
      last = err;
      ctx.log(`${message.id}: ${ds.name} failed: ${err.code} ${err.responseCode ?? ''} ${err.message}`);
      if (refusesMessage(err)) {
        ctx.log(`${message.id}: ${ds.name} refused the message permanently; not trying the other downstreams`);
        throw err;
      }
    }
  }
  throw last ?? new SendError({ code: 'SMTPMUX_SEND_LIMIT', downstream: null, permanent: false, message: 'no downstream could be tried' });
}
