// @ts-check
/// <reference path="./smtpmux.d.ts" />
/**
 * Waterfall: try every downstream in config order, driving ctx.send() directly.
 *
 * The first downstream in the config gets every message; when it fails (temporarily or permanently)
 * the failure is logged and the next one is tried, and so on until one accepts. When all of them fail,
 * the last SendError is rethrown, and the host answers the client from the attempts it recorded
 * (a temporary 4xx unless every downstream refused the message permanently).
 *
 * Configure:   users: [{ ..., selector: waterfall.js, downstreams: [primary, backup, last-resort] }]
 * Order the downstreams by preference. `limits.max_sends` (default 5) caps how many are tried.
 *
 * A downstream that is cooling down after failures (`state: 'cooling'`, see `cooldown:` in the config) is
 * skipped without a send(). When every one is cooling, the one whose cooldown ends first is tried: SMTP
 * Mux lets that through as a probe now and then (so the proxy heals itself) and refuses it at once
 * otherwise.
 */

/**
 * @param {Message} message
 * @param {readonly Downstream[]} downstreams
 * @param {Ctx} ctx this message's send(), log() and state
 * @returns {Promise<SelectResult>}
 */
async function select(message, downstreams, ctx) {
  if (downstreams.length === 0) return 'no downstream is configured';
  const up = downstreams.filter((ds) => ds.state !== 'cooling');
  for (const ds of downstreams) {
    if (ds.state === 'cooling') ctx.log(`${message.id}: skipping ${ds.name}, cooling down until ${new Date(ds.cooldownUntil ?? 0).toISOString()}`);
  }
  const order = up.length > 0 ? up : [...downstreams].sort((a, b) => (a.cooldownUntil ?? 0) - (b.cooldownUntil ?? 0)).slice(0, 1);
  /** @type {SendError | undefined} */
  let last;
  for (const ds of order) {
    try {
      const result = await ctx.send(ds);
      ctx.log(`${message.id}: delivered via ${result.downstream} in ${result.ms} ms`);
      return undefined; // delivered: nothing for the host to do
    } catch (err) {
      if (!(err instanceof SendError)) throw err; // a bug, not a delivery failure
      if (err.code === 'SMTPMUX_SEND_LIMIT') {
        ctx.log(`${message.id}: send limit reached before trying ${ds.name}`);
        break;
      }
      last = err;
      const kind = err.permanent ? 'permanent' : 'temporary';
      ctx.log(`${message.id}: ${ds.name} failed (${kind}, ${err.code}${err.responseCode ? ` ${err.responseCode}` : ''}): ${err.message}`);
    }
  }
  throw last ?? new SendError({ code: 'SMTPMUX_SEND_LIMIT', downstream: null, permanent: false, message: 'no downstream could be tried' });
}
