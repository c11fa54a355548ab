// The host-side state that will outgrow one process: downstream health (cooldowns), rate and quota
// windows, login-failure penalties and selectors' ctx.state. Every operation is one atomic step on any
// backend (in memory: one synchronous block; on Redis: one Lua script), never read-modify-write across
// calls, so a shared backend replaces the in-memory one without touching the code that uses it.
// Callers build the keys (`ds:<name>`, `login:ip:<addr>`, `sel:<user>:<key>`); a backend may prefix them.

/** What the last back-off signal of a downstream was: a code and the reply text, never credentials. */
export interface LastError {
  readonly code: string;
  readonly response?: string;
  readonly at: number;
}

export interface HealthSnapshot {
  /** Consecutive failures since the last success. */
  readonly failures: number;
  /** Until when (ms since the epoch) the downstream is not to be contacted; null when up. */
  readonly cooldownUntil: number | null;
  readonly lastError: LastError | null;
}

export interface QuotaSnapshot {
  /** What the rolling window holds now: accepted deliveries plus reservations in flight. */
  readonly used: number;
  /** When the oldest entry leaves the window (ms since the epoch); null when the window is empty. */
  readonly resetsAt: number | null;
}

export type RateGrant =
  /** A slot is reserved; use it after waiting `waitMs` (0: now). */
  | { readonly ok: true; readonly waitMs: number }
  /** No slot within the allowed wait; the next one frees in `retryInMs`. Nothing was reserved. */
  | { readonly ok: false; readonly retryInMs: number };

export interface QuotaGrant extends QuotaSnapshot {
  /** True: `amount` is reserved under the id (and counted in `used`). False: it did not fit; nothing changed. */
  readonly ok: boolean;
}

/** Which backend serves the state, and whether it is degraded (for logs, metrics and readiness detail). */
export interface StateStatus {
  readonly backend: 'memory' | 'redis';
  /** True when several instances share these limits (a reachable Redis). */
  readonly shared: boolean;
  /** True while a shared backend is unreachable and limits are per instance. */
  readonly degraded: boolean;
  /** Since when (ms since the epoch) it has been degraded; null when not. */
  readonly since: number | null;
  /** Why, in a few words (never a credential); null when not degraded. */
  readonly reason: string | null;
  /** Operations served by the local fallback since the process started. */
  readonly localOperations: number;
}

export interface StateStore {
  /**
   * Reserves `cost` slots (1 per message, or one per recipient) of a smooth rate of `limit` per
   * `periodMs` (GCRA: slots are spaced periodMs/limit apart), if the first of them is due within
   * `maxWaitMs`; the next caller then waits for all `cost` of them to pass.
   */
  acquireRate(key: string, limit: number, periodMs: number, maxWaitMs: number, cost: number): Promise<RateGrant>;
  /** Slots that could be taken right now without waiting (0..limit), for views. */
  rateAvailable(key: string, limit: number, periodMs: number): Promise<number>;

  /**
   * Reserves `amount` under `id` in a rolling window of `windowMs` if used + amount <= limit. The
   * reservation counts as used until released (the delivery failed) or until it leaves the window.
   */
  reserveQuota(key: string, id: string, amount: number, limit: number, windowMs: number): Promise<QuotaGrant>;
  /** Gives back a reservation whose delivery was not accepted. Unknown ids are ignored. */
  releaseQuota(key: string, id: string): Promise<void>;
  quotaUsage(key: string, windowMs: number): Promise<QuotaSnapshot>;

  /**
   * Records a failure of a downstream. With `cooldown` (a back-off signal) the downstream cools for
   * baseMs × 2^(signals in a row − 1), at most maxMs; without, only the failure count and last error change.
   */
  recordFailure(key: string, error: LastError, cooldown: { baseMs: number; maxMs: number } | null): Promise<HealthSnapshot>;
  /** The first success clears failures and cooldown. */
  recordSuccess(key: string): Promise<void>;
  health(key: string): Promise<HealthSnapshot>;

  /** Counts a failed login; the count expires `windowMs` after the last failure. Returns the new count. */
  recordLoginFailure(key: string, windowMs: number): Promise<number>;
  loginFailures(key: string): Promise<number>;
  clearLoginFailures(key: string): Promise<void>;

  /**
   * ctx.state: values are JSON text, bounded by the caller. With `scope`, a set or incr that would create
   * a key in a scope already holding `maxKeys` live keys throws StateFullError and changes nothing
   * (keys that exist may always be written).
   */
  get(key: string): Promise<string | undefined>;
  set(key: string, json: string, ttlMs?: number, scope?: StateScope): Promise<void>;
  /** Adds `by` to an integer (a missing key counts as 0) and returns the result; a non-integer value throws StateTypeError. */
  incr(key: string, by: number, ttlMs?: number, scope?: StateScope): Promise<number>;

  /** Synchronous and cheap: a metrics scrape or a readiness probe may call it. */
  status(): StateStatus;

  close(): Promise<void>;
}

/** A group of keys with a bound on how many may live at once (one user's ctx.state). */
export interface StateScope {
  readonly name: string;
  readonly maxKeys: number;
}

/** A set or incr that would create one key too many in its scope. */
export class StateFullError extends Error {
  constructor(readonly scope: string) {
    super(`state scope "${scope}" is full`);
    this.name = 'StateFullError';
  }
}

/**
 * A piece of a key that comes from config (a login, a downstream name) and may contain ':': escaped, so
 * that "a:b" + "c" can never meet "a" + "b:c". Text without ':' or '%' is unchanged (keys stay readable).
 */
export function keyPart(text: string): string {
  return text.replaceAll('%', '%25').replaceAll(':', '%3A');
}

/** incr() on a value that is not an integer. */
export class StateTypeError extends Error {
  constructor(readonly key: string) {
    super(`state value "${key}" is not an integer`);
    this.name = 'StateTypeError';
  }
}
