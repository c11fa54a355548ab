/**
 * The demo's selector: round robin, the same as the bundled selectors/round-robin.js. Edit me!
 *
 * SMTP Mux runs select() once per message, in a sandbox (no require, no timers, no network), and
 * reloads this file as soon as you save it. Send a few messages with the swaks command the demo
 * printed and watch them alternate between the two inboxes; then try one of the ideas below.
 *
 * select(message, downstreams) gets read-only copies of:
 *   message      { id, user, from, to: [...], size, subject, clientAddress }
 *   downstreams  [{ name, addr, host, port, tls, tags: [...], weight }, ...]  (never the passwords)
 * and returns one of:
 *   - a downstream name, or a list of names / downstreams to try in that order (the rest is failover);
 *   - nothing, after delivering itself with `await send(downstream)` (it throws a SendError on failure);
 *   - any other string (or a thrown Error) to refuse the message with that reason.
 * log(...) writes a line to SMTP Mux's log. Types: selectors/smtpmux.d.ts; more examples: selectors/.
 *
 * Ideas to try:
 *   return 'inbox2';                                            // everything to the second inbox
 *   return message.subject.includes('urgent') ? 'inbox1' : 'inbox2';
 *   return message.to[0].endsWith('@example.com') ? 'inbox1' : 'inbox2';
 *   for (const ds of downstreams) {                             // waterfall: first one that accepts
 *     try { await send(ds); return; } catch (err) { log(ds.name, 'failed:', err.message); }
 *   }                                                           // (declare `async function select`)
 */

/** Messages routed so far; module state lives until the file is edited and reloaded. */
let count = 0;

function select(message, downstreams) {
  const start = count++ % downstreams.length;
  // The chosen downstream first, the others after it as failover.
  const order = [...downstreams.slice(start), ...downstreams.slice(0, start)];
  log(`message ${message.id} "${message.subject}" -> ${order[0].name}`);
  return order;
}
