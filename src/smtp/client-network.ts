// What counts as one client for connection limits and login penalties: an IPv4 address, or an IPv6
// /64. One subscriber or one server gets a whole /64 (RFC 6177), so counting IPv6 clients per /128
// would give anyone 2^64 fresh addresses to guess passwords from, each with a clean penalty.
import { isIPv6 } from 'node:net';

/** The bits of an IPv6 address one client is assumed to hold all of. */
export const IPV6_CLIENT_PREFIX = 64;

/** The 16-bit groups of a part of an IPv6 address; an embedded IPv4 tail (a.b.c.d) is two of them. */
function groups(part: string): string[] {
  if (part === '') return [];
  return part.split(':').flatMap((g) => (g.includes('.') ? ['0', '0'] : [g]));
}

/** The key one client is counted under: the address itself, or for IPv6 its /64 as `a:b:c:d::/64`. */
export function clientNetwork(address: string): string {
  if (!isIPv6(address)) return address;
  // An IPv4 client on a dual-stack listener (smtp-server already strips this, but not every caller is it).
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  if (mapped) return mapped[1];
  const [head, tail] = address.toLowerCase().split('::');
  const before = groups(head);
  const after = tail === undefined ? [] : groups(tail);
  const all = [...before, ...Array<string>(8 - before.length - after.length).fill('0'), ...after];
  const prefix = all.slice(0, IPV6_CLIENT_PREFIX / 16).map((g) => parseInt(g, 16).toString(16));
  return `${prefix.join(':')}::/${IPV6_CLIENT_PREFIX}`;
}
