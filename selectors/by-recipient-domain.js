// @ts-check
/// <reference path="./smtpmux.d.ts" />
/**
 * By recipient domain: route on the domain of the first recipient, using downstream tags.
 *
 * A downstream tagged `domain:example.com` is preferred for mail to anyone@example.com (exact domain,
 * case-insensitive: tag subdomains separately). The list returned is: the downstreams tagged for the
 * domain, then the ones tagged `default` (the catch-all for every other domain), then all the rest, each
 * group in config order. The host tries them in that order, so the later ones are failover.
 *
 * Configure:   selector: by-recipient-domain.js
 *              downstreams:
 *                - { name: corp,  addr: "mx.corp.example:25",   tags: ["domain:corp.example", "domain:corp.example.org"] }
 *                - { name: relay, addr: "smtp.relay.example:587", tags: ["default"] }
 *
 * Only the first recipient decides: a message to several domains goes out once, through one downstream.
 */

/**
 * The domain of an address, lower-cased: "Bob@Example.COM" → "example.com", "<bob@x.io>" → "x.io".
 * @param {string | undefined} address
 * @returns {string}
 */
function domainOf(address) {
  const text = (address ?? '').trim().replace(/^<|>$/g, '');
  const at = text.lastIndexOf('@');
  return at < 0 ? '' : text.slice(at + 1).toLowerCase();
}

/**
 * @param {Message} message
 * @param {readonly Downstream[]} downstreams
 * @returns {SelectResult}
 */
function select(message, downstreams) {
  if (downstreams.length === 0) return 'no downstream is configured';
  const domain = domainOf(message.to[0]);
  /** @param {Downstream} ds */
  const forDomain = (ds) => domain !== '' && ds.tags.some((tag) => tag.toLowerCase() === `domain:${domain}`);
  /** @param {Downstream} ds */
  const isDefault = (ds) => ds.tags.includes('default');

  const matching = downstreams.filter(forDomain);
  const defaults = downstreams.filter((ds) => !forDomain(ds) && isDefault(ds));
  const rest = downstreams.filter((ds) => !forDomain(ds) && !isDefault(ds));
  return [...matching, ...defaults, ...rest];
}
