// Login penalties across connections, per client address and per login (Dovecot's auth_penalty,
// Postfix's anvil): after a few failures each further attempt waits exponentially longer, success and
// failure alike, and past a limit an address is refused outright until its failures expire. Counters
// live behind the StateStore, so several instances share them once the store is shared. "Address" here
// is the client network the caller passes in (src/smtp/client-network.ts: an IPv4 address or an IPv6 /64).
import { createHash } from 'node:crypto';
import type { StateStore } from '../state/store';

export interface PenaltySettings {
  /** Every failed login is answered after at least this long; also the first penalised wait. */
  readonly failureDelayMs: number;
  /** Failures per address within the window before attempts start to wait. */
  readonly freeFailures: number;
  /** The longest wait an attempt gets. */
  readonly maxDelayMs: number;
  /** Failures per address after which logins from it are refused (454 on AUTH, 421 on connect). */
  readonly lockoutFailures: number;
  /** Failures are forgotten this long after the last one. */
  readonly windowMs: number;
}

export type AttemptVerdict =
  /** Refused without looking at the password: the address is locked out. */
  | { readonly kind: 'locked' }
  /** Go ahead: check the password, answer no sooner than `waitMs` after the attempt began. */
  | { readonly kind: 'check'; readonly waitMs: number };

/** A short, stable name for a login that is safe to log and to use as a key: never the login itself. */
export function loginHash(login: string): string {
  return createHash('sha256').update(login.trim().toLowerCase(), 'utf8').digest('hex').slice(0, 12);
}

const addressKey = (address: string): string => `login:ip:${address}`;
const loginKey = (login: string): string => `login:user:${loginHash(login)}`;

/** The wait after `failures` failures when the first `free` cost nothing: base, 2×base, 4×base... up to max. */
export function penaltyDelay(failures: number, free: number, settings: PenaltySettings): number {
  if (failures < free) return 0;
  return Math.min(settings.maxDelayMs, settings.failureDelayMs * 2 ** Math.min(failures - free, 30));
}

export class LoginPenalties {
  /** Per address, the end of the last attempt queued there. */
  private readonly queues = new Map<string, Promise<void>>();

  constructor(
    private readonly store: StateStore,
    private readonly settings: () => PenaltySettings,
  ) {}

  /**
   * Runs one attempt from `address` (begin, the password check, succeeded or failed) after the earlier
   * ones from that address are decided. begin() counts an attempt before its password is checked, so
   * without this a burst of correct logins from one client (an app opening 15 connections at once)
   * counted as 15 failures and locked the address out. In a row, each success clears the count before
   * the next attempt; parallel guesses are still counted one by one. Only the decisions queue, not the
   * waits the caller adds afterwards; the queue is as long as the connections the address may hold.
   */
  async oneAtATime<T>(address: string, attempt: () => Promise<T>): Promise<T> {
    const result = (this.queues.get(address) ?? Promise.resolve()).then(attempt);
    const settled = result.then(
      () => undefined,
      () => undefined,
    );
    this.queues.set(address, settled);
    try {
      return await result;
    } finally {
      if (this.queues.get(address) === settled) this.queues.delete(address);
    }
  }

  /** True when connections from this address are to be turned away (421) until its failures expire. */
  async lockedOut(address: string): Promise<boolean> {
    return (await this.store.loginFailures(addressKey(address))) >= this.settings().lockoutFailures;
  }

  /**
   * Called when an AUTH arrives, before its password is checked. The attempt is counted against the
   * address at once (a success clears it), so parallel attempts from one address each see the ones
   * before them and a client that hangs up early has still paid for its guess.
   */
  async begin(address: string, login: string): Promise<AttemptVerdict> {
    const settings = this.settings();
    const [count, loginFailures] = await Promise.all([
      this.store.recordLoginFailure(addressKey(address), settings.windowMs),
      this.store.loginFailures(loginKey(login)),
    ]);
    if (count > settings.lockoutFailures) return { kind: 'locked' };
    // A login guessed from many addresses slows down too, later than one address does, so its owner
    // logging in from elsewhere is not held up by one noisy address.
    const waitMs = Math.max(penaltyDelay(count - 1, settings.freeFailures, settings), penaltyDelay(loginFailures, settings.lockoutFailures * 2, settings));
    return { kind: 'check', waitMs };
  }

  async succeeded(address: string): Promise<void> {
    await this.store.clearLoginFailures(addressKey(address));
  }

  async failed(login: string): Promise<void> {
    await this.store.recordLoginFailure(loginKey(login), this.settings().windowMs);
  }
}
