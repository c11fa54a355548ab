// @ts-check
/// <reference path="./smtpmux.d.ts" />
/**
 * Round robin: strict rotation over the user's downstreams.
 *
 * Message 1 goes first to downstream 1, message 2 to downstream 2, ... and back to 1. The whole list is
 * returned, rotated, so when the chosen downstream refuses the message the host fails over to the next
 * ones in turn.
 *
 * Configure:   users: [{ ..., selector: round-robin.js, downstreams: [a, b, c] }]
 * Nothing else to set: every downstream takes part, weights and tags are ignored (see weighted.js).
 *
 * The counter is module state: it lives as long as the loaded script, and starts over at 0 when the
 * script is reloaded (or killed for overrunning its limits). It is kept per set of downstreams, so
 * users sharing this file each get their own strict rotation.
 */

/** Messages routed so far, per downstream set (keyed by the names, in config order). */
const counters = new Map();

/**
 * @param {Message} message
 * @param {readonly Downstream[]} downstreams
 * @returns {SelectResult}
 */
function select(message, downstreams) {
  if (downstreams.length === 0) return 'no downstream is configured';
  const key = downstreams.map((ds) => ds.name).join('\n');
  const count = counters.get(key) ?? 0;
  counters.set(key, count + 1);
  const start = count % downstreams.length;
  // [start, start+1, ..., last, 0, ..., start-1]: the chosen one first, the others as failover.
  return [...downstreams.slice(start), ...downstreams.slice(0, start)];
}
