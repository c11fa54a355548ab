// @ts-check
/// <reference path="./smtpmux.d.ts" />
/**
 * Quota-aware: spread messages over the providers that have quota left, preferring the one with the
 * most remaining.
 *
 * Every message goes first to the downstream with the largest `quota.remaining` (ties: fewer attempts in
 * flight, then config order), so daily allowances drain evenly instead of one provider running dry while
 * another sits idle. Downstreams without a `quota:` follow (unlimited, e.g. a paid relay kept as
 * overflow), then those out of quota or cooling down, last: SMTP Mux skips those anyway, and probes a
 * cooling one when nothing else is left. The full list is returned, so the host fails over in that order.
 *
 * Configure:   selector: quota-aware.js
 *              downstreams:
 *                - { name: ses,      addr: "email-smtp.eu-west-1.amazonaws.com:587", quota: 200/24h, rate: 1/s, count: recipients }
 *                - { name: gmail,    addr: "smtp.gmail.com:587", quota: 500/24h, count: recipients }
 *                - { name: overflow, addr: "relay.example:587" }
 * The quota figures a script sees are a snapshot taken as the message starts.
 */

/**
 * @param {Message} message
 * @param {readonly Downstream[]} downstreams
 * @returns {SelectResult}
 */
function select(message, downstreams) {
  if (downstreams.length === 0) return 'no downstream is configured';
  /** @param {Downstream} ds */
  const usable = (ds) => ds.state !== 'cooling' && (ds.quota === null || ds.quota.remaining > 0);
  const withQuota = downstreams
    .filter((ds) => usable(ds) && ds.quota !== null)
    // sort() is stable: equal candidates keep config order.
    .sort((a, b) => (b.quota?.remaining ?? 0) - (a.quota?.remaining ?? 0) || a.inflight - b.inflight);
  const unlimited = downstreams.filter((ds) => usable(ds) && ds.quota === null);
  const rest = downstreams.filter((ds) => !usable(ds));
  return [...withQuota, ...unlimited, ...rest];
}
