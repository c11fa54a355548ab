// @ts-check
/// <reference path="./smtpmux.d.ts" />
/**
 * Weighted: smooth weighted round robin (nginx's algorithm) over the downstreams' `weight`.
 *
 * With weights a=3, b=1 the first choices run a, a, b, a, a, a, b, a, ...: each downstream leads a share
 * of messages proportional to its weight, spread out evenly rather than in bursts, and the sequence is
 * deterministic. The full list is returned: the chosen downstream first, then the others by weight
 * (highest first, config order between equals) as failover. A downstream of weight 0 is never chosen
 * first but is still tried, last, as a failover.
 *
 * Configure:   selector: weighted.js
 *              downstreams:
 *                - { name: big,   addr: "smtp.big.example:587",   weight: 3 }
 *                - { name: small, addr: "smtp.small.example:587", weight: 1 }
 *                - { name: spare, addr: "smtp.spare.example:587", weight: 0 }
 * `weight` defaults to 1, so without weights this is plain round robin.
 *
 * The running scores are module state: they start over when the script is reloaded (or killed for
 * overrunning its limits). They are kept per set of downstreams (names and weights), so users sharing
 * this file, or a config change, each start a fresh sequence.
 */

/** Per downstream set: each downstream's current score, by name. */
const scores = new Map();

/**
 * Picks the next downstream by smooth weighted round robin: every candidate's score grows by its weight,
 * the highest score wins (the first in config order on a tie) and pays back the total of the weights.
 * @param {readonly Downstream[]} candidates downstreams of weight > 0
 * @param {Map<string, number>} current score by name, updated in place
 * @returns {Downstream}
 */
function pick(candidates, current) {
  let total = 0;
  let best = candidates[0];
  for (const ds of candidates) {
    current.set(ds.name, (current.get(ds.name) ?? 0) + ds.weight);
    total += ds.weight;
    if ((current.get(ds.name) ?? 0) > (current.get(best.name) ?? 0)) best = ds;
  }
  current.set(best.name, (current.get(best.name) ?? 0) - total);
  return best;
}

/**
 * @param {Message} message
 * @param {readonly Downstream[]} downstreams
 * @returns {SelectResult}
 */
function select(message, downstreams) {
  if (downstreams.length === 0) return 'no downstream is configured';
  const candidates = downstreams.filter((ds) => ds.weight > 0);
  if (candidates.length === 0) return [...downstreams]; // every weight is 0: config order

  const key = downstreams.map((ds) => `${ds.name}=${ds.weight}`).join('\n');
  let current = scores.get(key);
  if (!current) scores.set(key, (current = new Map()));

  const first = pick(candidates, current);
  // Failover order: heaviest first; sort() is stable, so equal weights keep config order; weight 0 ends up last.
  const byWeight = [...downstreams].sort((a, b) => b.weight - a.weight);
  return [first, ...byWeight.filter((ds) => ds !== first)];
}
