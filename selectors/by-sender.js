// @ts-check
/// <reference path="./smtpmux.d.ts" />
/**
 * By sender: route on the envelope sender (MAIL FROM), using downstream tags.
 *
 * A downstream tagged `sender:alice@example.com` is preferred for mail from that exact address; one
 * tagged `sender:example.com` for mail from anyone at that domain (both case-insensitive). The list
 * returned is: address matches, then domain matches, then downstreams tagged `default`, then all the
 * rest, each group in config order. The host tries them in that order, so the later ones are failover.
 *
 * Configure:   selector: by-sender.js
 *              downstreams:
 *                - { name: ceo,       addr: "smtp.vip.example:587",  tags: ["sender:ceo@corp.example"] }
 *                - { name: marketing, addr: "smtp.bulk.example:587", tags: ["sender:news.corp.example"] }
 *                - { name: relay,     addr: "smtp.relay.example:587", tags: ["default"] }
 *
 * A null sender (bounces, MAIL FROM:<>) matches no sender tag and goes to `default`, then the rest.
 */

/**
 * @param {Message} message
 * @param {readonly Downstream[]} downstreams
 * @returns {SelectResult}
 */
function select(message, downstreams) {
  if (downstreams.length === 0) return 'no downstream is configured';
  const address = message.from.trim().replace(/^<|>$/g, '').toLowerCase();
  const at = address.lastIndexOf('@');
  const domain = at < 0 ? '' : address.slice(at + 1);

  /** @param {Downstream} ds @param {string} value */
  const tagged = (ds, value) => value !== '' && ds.tags.some((tag) => tag.toLowerCase() === `sender:${value}`);
  /** @param {Downstream} ds @returns {number} lower ranks come first */
  const rank = (ds) => (at >= 0 && tagged(ds, address) ? 0 : tagged(ds, domain) ? 1 : ds.tags.includes('default') ? 2 : 3);

  // sort() is stable: within a rank, config order is kept.
  return [...downstreams].sort((a, b) => rank(a) - rank(b));
}
