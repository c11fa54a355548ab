// Stored passwords: what a `password:` value in the config means and how a login is checked against it.
// argon2id (`$argon2id$...`, Dovecot `{ARGON2ID}$argon2id$...`) and bcrypt (`$2a$`/`$2b$`/`$2y$`, Dovecot
// `{BLF-CRYPT}$2y$...`, what `htpasswd -B` writes) are verified; anything else is a plaintext password
// (the Go original's configs), compared in constant time.
import { createHash, timingSafeEqual } from 'node:crypto';
import os from 'node:os';
import { bcryptVerify } from './bcrypt-pool';

export type PasswordScheme = 'plain' | 'argon2id' | 'bcrypt';

export interface StoredPassword {
  readonly scheme: PasswordScheme;
  /** A fingerprint of the stored value (never the value): changes when the password is rotated. */
  readonly id: string;
  /** True when `given` is the password. Hashes are verified off the event loop (argon2 on libuv's pool, bcrypt on worker threads). */
  verify(given: string): Promise<boolean>;
}

const ARGON2ID = /^\$argon2id\$v=\d+\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+$/;
// bcrypt: $2a$/$2b$/$2y$, two-digit cost, 22 characters of salt and 31 of hash in bcrypt's base64.
const BCRYPT = /^\$2[aby]\$\d{2}\$[./A-Za-z0-9]{53}$/;
const DOVECOT_PREFIX = /^\{(ARGON2ID|BLF-CRYPT)\}/i;
const PLAIN_PREFIX = /^\{(PLAIN|CLEARTEXT)\}/i;

/**
 * argon2 runs on libuv's pool (4 threads by default, 19 MiB each): on a small machine a burst of logins
 * would take every core from the event loop. At most one verification per core but one runs at a time.
 */
const ARGON2_AT_ONCE = Math.max(1, os.availableParallelism() - 1);
let argon2Running = 0;
const argon2Waiting: (() => void)[] = [];

async function limitedArgon2Verify(hash: string, given: string): Promise<boolean> {
  // A finished verification hands its slot straight to the next in line.
  if (argon2Running >= ARGON2_AT_ONCE) await new Promise<void>((resolve) => argon2Waiting.push(resolve));
  else argon2Running++;
  try {
    return await (await argon2()).verify(hash, given).catch(() => false);
  } finally {
    const next = argon2Waiting.shift();
    if (next) next();
    else argon2Running--;
  }
}

/** @node-rs/argon2 (a native addon), loaded at the first argon2id login or hash: a config of plaintext or bcrypt passwords never maps it. */
const argon2 = (): Promise<typeof import('@node-rs/argon2')> => import('@node-rs/argon2');

const sha256 = (text: string): Buffer => createHash('sha256').update(text, 'utf8').digest();

/** Which scheme a stored value uses, and the hash without a Dovecot prefix; plaintext when it is no known hash. */
export function classifyPassword(stored: string): { scheme: PasswordScheme; hash: string } {
  const prefix = DOVECOT_PREFIX.exec(stored);
  const value = prefix ? stored.slice(prefix[0].length) : stored;
  if (ARGON2ID.test(value)) return { scheme: 'argon2id', hash: value };
  if (BCRYPT.test(value)) return { scheme: 'bcrypt', hash: value };
  // Dovecot's {PLAIN} marks a cleartext password explicitly.
  const plain = PLAIN_PREFIX.exec(stored);
  return { scheme: 'plain', hash: plain ? stored.slice(plain[0].length) : stored };
}

/** A value that looks like a hash (a `$2...$`/`$argon2...` or Dovecot `{...}` prefix) but is not a valid one: almost surely a paste error. */
export function looksLikeBrokenHash(stored: string): boolean {
  return classifyPassword(stored).scheme === 'plain' && !PLAIN_PREFIX.test(stored) && /^(\{[A-Z0-9-]+\}|\$2[abxy]?\$|\$argon2(id|i|d)\$)/i.test(stored);
}

export function storedPassword(stored: string): StoredPassword {
  const { scheme, hash } = classifyPassword(stored);
  const id = sha256(`${scheme}\0${stored}`).toString('hex').slice(0, 16);
  switch (scheme) {
    case 'argon2id':
      return { scheme, id, verify: (given) => limitedArgon2Verify(hash, given) };
    case 'bcrypt':
      // bcrypt reads at most 72 bytes; bcryptjs treats $2y$ as $2b$ (they are the same algorithm).
      return { scheme, id, verify: (given) => bcryptVerify(given, hash) };
    default: {
      const digest = sha256(hash);
      return { scheme, id, verify: async (given) => timingSafeEqual(sha256(given), digest) };
    }
  }
}

/** An argon2id hash of `password` with the library's defaults (19 MiB, 2 passes, 1 lane: OWASP's minimum). */
export async function hashPassword(password: string): Promise<string> {
  return (await argon2()).hash(password);
}
