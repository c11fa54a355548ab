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
 * The counter is kept in ctx.state, so the rotation carries on across reloads (and when the isolate is
 * rebuilt); incr() is atomic, so concurrent messages never take the same turn. ctx.state is per user:
 * users sharing this file each get their own rotation.
 */

/**
 * @param {Message} message
 * @param {readonly Downstream[]} downstreams
 * @param {Ctx} ctx
 * @returns {Promise<SelectResult>}
 */
async function select(message, downstreams, ctx) {
  if (downstreams.length === 0) return 'no downstream is configured';
  const count = (await ctx.state.incr('round-robin')) - 1;
  const start = count % downstreams.length;
  // [start, start+1, ..., last, 0, ..., start-1]: the chosen one first, the others as failover.
  return [...downstreams.slice(start), ...downstreams.slice(0, start)];
}
