// The in-process StateStore: each operation is one synchronous block, so it is atomic by construction.
// Entries that expire are dropped when touched and by a sweep every few thousand operations, so keys
// that are never read again (a login from an address seen once) do not pile up.
import { StateFullError, StateTypeError, type HealthSnapshot, type LastError, type QuotaGrant, type QuotaSnapshot, type RateGrant, type StateScope, type StateStatus, type StateStore } from './store';

interface Health {
  failures: number;
  /** Back-off signals in a row: the cooldown doubles with each. */
  signals: number;
  cooldownUntil: number | null;
  lastError: LastError | null;
}

interface Expiring<T> {
  value: T;
  expiresAt: number;
}

const SWEEP_EVERY = 4096;

export class MemoryStateStore implements StateStore {
  /** GCRA: the theoretical arrival time of the next slot, per key. */
  private readonly rates = new Map<string, Expiring<number>>();
  private readonly quotas = new Map<string, QuotaWindow>();
  private readonly healths = new Map<string, Health>();
  private readonly logins = new Map<string, Expiring<number>>();
  private readonly values = new Map<string, Expiring<string>>();
  /** Keys each scope created; some may have expired since (dropped when the scope is counted). */
  private readonly scopes = new Map<string, Set<string>>();
  private operations = 0;

  constructor(private readonly now: () => number = Date.now) {}

  async acquireRate(key: string, limit: number, periodMs: number, maxWaitMs: number, cost: number): Promise<RateGrant> {
    const now = this.tick();
    const interval = periodMs / limit;
    const tat = Math.max(this.live(this.rates, key, now) ?? now, now);
    const waitMs = tat - now;
    if (waitMs > maxWaitMs) return { ok: false, retryInMs: Math.ceil(waitMs) };
    const next = tat + interval * Math.max(1, cost);
    this.rates.set(key, { value: next, expiresAt: next });
    // A wait under a millisecond is no wait: a timer cannot honour it, and rounding it up to 1 ms would
    // make every message of a fast rate sleep.
    return { ok: true, waitMs: waitMs < 1 ? 0 : Math.ceil(waitMs) };
  }

  async rateAvailable(key: string, limit: number, periodMs: number): Promise<number> {
    const now = this.tick();
    const tat = this.live(this.rates, key, now) ?? now;
    const interval = periodMs / limit;
    return Math.max(0, Math.min(limit, Math.floor((now + periodMs - Math.max(tat, now)) / interval)));
  }

  async reserveQuota(key: string, id: string, amount: number, limit: number, windowMs: number): Promise<QuotaGrant> {
    const now = this.tick();
    const window = this.window(key, windowMs, now);
    const used = window.used;
    if (used + amount > limit) return { ok: false, used, resetsAt: oldest(window) };
    releaseFrom(window, id);
    window.entries.set(id, { amount, at: now });
    window.used += amount;
    return { ok: true, used: window.used, resetsAt: oldest(window) };
  }

  async releaseQuota(key: string, id: string): Promise<void> {
    this.tick();
    const window = this.quotas.get(key);
    if (window) releaseFrom(window, id);
  }

  async quotaUsage(key: string, windowMs: number): Promise<QuotaSnapshot> {
    const now = this.tick();
    const window = this.window(key, windowMs, now);
    return { used: window.used, resetsAt: oldest(window) };
  }

  async recordFailure(key: string, error: LastError, cooldown: { baseMs: number; maxMs: number } | null): Promise<HealthSnapshot> {
    const now = this.tick();
    const health = this.healths.get(key) ?? { failures: 0, signals: 0, cooldownUntil: null, lastError: null };
    health.failures++;
    health.lastError = error;
    if (cooldown) {
      health.signals++;
      const pause = Math.min(cooldown.maxMs, cooldown.baseMs * 2 ** Math.min(health.signals - 1, 40));
      health.cooldownUntil = now + pause;
    }
    this.healths.set(key, health);
    return snapshot(health, now);
  }

  async recordSuccess(key: string): Promise<void> {
    this.tick();
    this.healths.delete(key);
  }

  async health(key: string): Promise<HealthSnapshot> {
    const now = this.tick();
    const health = this.healths.get(key);
    return health ? snapshot(health, now) : { failures: 0, cooldownUntil: null, lastError: null };
  }

  async recordLoginFailure(key: string, windowMs: number): Promise<number> {
    const now = this.tick();
    const count = (this.live(this.logins, key, now) ?? 0) + 1;
    this.logins.set(key, { value: count, expiresAt: now + windowMs });
    return count;
  }

  async loginFailures(key: string): Promise<number> {
    return this.live(this.logins, key, this.tick()) ?? 0;
  }

  async clearLoginFailures(key: string): Promise<void> {
    this.tick();
    this.logins.delete(key);
  }

  async get(key: string): Promise<string | undefined> {
    return this.live(this.values, key, this.tick());
  }

  async set(key: string, json: string, ttlMs?: number, scope?: StateScope): Promise<void> {
    const now = this.tick();
    if (scope) this.admit(key, scope, now);
    this.values.set(key, { value: json, expiresAt: ttlMs === undefined ? Infinity : now + ttlMs });
  }

  async incr(key: string, by: number, ttlMs?: number, scope?: StateScope): Promise<number> {
    const now = this.tick();
    const current = this.live(this.values, key, now);
    if (scope && current === undefined) this.admit(key, scope, now);
    const value = current === undefined ? 0 : Number(current);
    if (!Number.isSafeInteger(value)) throw new StateTypeError(key);
    const next = value + by;
    if (!Number.isSafeInteger(next)) throw new StateTypeError(key);
    // A ttl given to incr applies when the key is created, as a counter window (Redis: SET NX PX, INCRBY).
    const expiresAt = current === undefined ? (ttlMs === undefined ? Infinity : now + ttlMs) : this.values.get(key)!.expiresAt;
    this.values.set(key, { value: String(next), expiresAt });
    return next;
  }

  status(): StateStatus {
    return { backend: 'memory', shared: false, degraded: false, since: null, reason: null, localOperations: 0 };
  }

  async close(): Promise<void> {
    this.rates.clear();
    this.quotas.clear();
    this.healths.clear();
    this.logins.clear();
    this.values.clear();
    this.scopes.clear();
  }

  /** Lets `key` into its scope, or throws StateFullError when the scope holds maxKeys live keys without it. */
  private admit(key: string, scope: StateScope, now: number): void {
    let members = this.scopes.get(scope.name);
    if (!members) this.scopes.set(scope.name, (members = new Set()));
    if (members.has(key) && this.live(this.values, key, now) !== undefined) return;
    if (members.size >= scope.maxKeys) {
      for (const member of members) if (this.live(this.values, member, now) === undefined) members.delete(member);
      if (members.size >= scope.maxKeys) throw new StateFullError(scope.name);
    }
    members.add(key);
  }

  private window(key: string, windowMs: number, now: number): QuotaWindow {
    let window = this.quotas.get(key);
    if (!window) {
      window = { windowMs, entries: new Map(), used: 0 };
      this.quotas.set(key, window);
    }
    window.windowMs = windowMs;
    expire(window, now);
    return window;
  }

  private live<T>(map: Map<string, Expiring<T>>, key: string, now: number): T | undefined {
    const entry = map.get(key);
    if (!entry) return undefined;
    if (entry.expiresAt <= now) {
      map.delete(key);
      return undefined;
    }
    return entry.value;
  }

  /** The clock, and now and then a sweep of what expired. */
  private tick(): number {
    const now = this.now();
    if (++this.operations % SWEEP_EVERY === 0) this.sweep(now);
    return now;
  }

  private sweep(now: number): void {
    for (const map of [this.rates, this.logins, this.values] as Map<string, Expiring<unknown>>[]) {
      for (const [key, entry] of map) if (entry.expiresAt <= now) map.delete(key);
    }
    for (const [key, window] of this.quotas) {
      expire(window, now);
      if (window.entries.size === 0) this.quotas.delete(key);
    }
    for (const [key, health] of this.healths) {
      if (health.cooldownUntil !== null && health.cooldownUntil <= now && health.lastError && health.lastError.at < now - 86_400_000) this.healths.delete(key);
    }
  }
}

/**
 * A rolling window: entries in the order they were made (a Map keeps insertion order, and each is made
 * at "now"), so the oldest are at the front; `used` is their running sum. Every operation is O(1)
 * amortized, whatever the quota, instead of a walk over a day's deliveries per message.
 */
interface QuotaWindow {
  windowMs: number;
  entries: Map<string, { amount: number; at: number }>;
  used: number;
}

function expire(window: QuotaWindow, now: number): void {
  for (const [id, entry] of window.entries) {
    if (entry.at > now - window.windowMs) break;
    window.entries.delete(id);
    window.used -= entry.amount;
  }
}

function releaseFrom(window: QuotaWindow, id: string): void {
  const entry = window.entries.get(id);
  if (!entry) return;
  window.entries.delete(id);
  window.used -= entry.amount;
}

function oldest(window: QuotaWindow): number | null {
  for (const entry of window.entries.values()) return entry.at + window.windowMs;
  return null;
}

function snapshot(health: Health, now: number): HealthSnapshot {
  const cooling = health.cooldownUntil !== null && health.cooldownUntil > now;
  return { failures: health.failures, cooldownUntil: cooling ? health.cooldownUntil : null, lastError: health.lastError };
}
