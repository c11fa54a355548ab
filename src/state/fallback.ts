// Keeps relaying when the shared state backend is down or slow: each operation goes to Redis, and
// when Redis fails or misses its deadline the store turns degraded and serves every operation from a
// local MemoryStateStore (limits per instance) until a probe, retried with backoff, finds Redis again.
// Quota is the limit that gets accounts suspended, so it is kept honest across the switch: reservations
// Redis granted are mirrored locally (an instance going local still counts what it sent in the window),
// and reservations and releases made locally while degraded are written back to Redis on recovery.
import type { Logger } from '../observe/logger';
import { MemoryStateStore } from './memory';
import type { RedisStateStore } from './redis';
import { StateFullError, StateTypeError, type HealthSnapshot, type LastError, type QuotaGrant, type QuotaSnapshot, type RateGrant, type StateScope, type StateStatus, type StateStore } from './store';

export interface FallbackOptions {
  /** First pause before probing Redis again; doubles up to maxProbeMs. */
  readonly minProbeMs?: number;
  readonly maxProbeMs?: number;
  /** How many local quota changes are kept to write back on recovery. */
  readonly maxPending?: number;
}

interface PendingReservation {
  readonly key: string;
  readonly id: string;
  readonly amount: number;
  readonly at: number;
  readonly windowMs: number;
}

export class FallbackStateStore implements StateStore {
  private degradedSince: number | null = null;
  private reason: string | null = null;
  private localOperations = 0;
  private probeDelay: number;
  /** When Redis last came back: a Redis that fails again soon after keeps the longer probe interval. */
  private recoveredAt = 0;
  private probeTimer: NodeJS.Timeout | undefined;
  private closed = false;
  /** Reservations taken locally while degraded and not given back: Redis gets them on recovery. */
  private readonly reserved = new Map<string, PendingReservation>();
  /** Releases of reservations Redis holds, made while degraded. */
  private readonly released = new Map<string, { key: string; id: string }>();

  constructor(
    private readonly primary: RedisStateStore,
    private readonly logger: Logger,
    private readonly options: FallbackOptions = {},
    private readonly local: MemoryStateStore = new MemoryStateStore(),
  ) {
    this.probeDelay = options.minProbeMs ?? 200;
  }

  /** Starts degraded when Redis is not reachable within `ms`, so start-up never waits longer on it. */
  async start(ms: number): Promise<void> {
    if (!(await this.primary.ready(ms))) this.degrade(`no connection within ${ms} ms`);
  }

  acquireRate(key: string, limit: number, periodMs: number, maxWaitMs: number, cost: number): Promise<RateGrant> {
    return this.run((s) => s.acquireRate(key, limit, periodMs, maxWaitMs, cost));
  }

  rateAvailable(key: string, limit: number, periodMs: number): Promise<number> {
    return this.run((s) => s.rateAvailable(key, limit, periodMs));
  }

  async reserveQuota(key: string, id: string, amount: number, limit: number, windowMs: number): Promise<QuotaGrant> {
    if (!this.degradedSince) {
      try {
        const grant = await this.primary.reserveQuota(key, id, amount, limit, windowMs);
        if (grant.ok) await this.local.reserveQuota(key, id, amount, limit, windowMs);
        return grant;
      } catch (err) {
        this.failed(err);
      }
    }
    this.localOperations++;
    const grant = await this.local.reserveQuota(key, id, amount, limit, windowMs);
    if (grant.ok) this.remember(this.reserved, `${key}\n${id}`, { key, id, amount, at: Date.now(), windowMs });
    return grant;
  }

  async releaseQuota(key: string, id: string): Promise<void> {
    await this.local.releaseQuota(key, id);
    if (!this.degradedSince) {
      try {
        return await this.primary.releaseQuota(key, id);
      } catch (err) {
        this.failed(err);
      }
    }
    this.localOperations++;
    const slot = `${key}\n${id}`;
    if (!this.reserved.delete(slot)) this.remember(this.released, slot, { key, id });
  }

  quotaUsage(key: string, windowMs: number): Promise<QuotaSnapshot> {
    return this.run((s) => s.quotaUsage(key, windowMs));
  }

  recordFailure(key: string, error: LastError, cooldown: { baseMs: number; maxMs: number } | null): Promise<HealthSnapshot> {
    return this.run((s) => s.recordFailure(key, error, cooldown));
  }

  recordSuccess(key: string): Promise<void> {
    return this.run((s) => s.recordSuccess(key));
  }

  health(key: string): Promise<HealthSnapshot> {
    return this.run((s) => s.health(key));
  }

  recordLoginFailure(key: string, windowMs: number): Promise<number> {
    return this.run((s) => s.recordLoginFailure(key, windowMs));
  }

  loginFailures(key: string): Promise<number> {
    return this.run((s) => s.loginFailures(key));
  }

  clearLoginFailures(key: string): Promise<void> {
    return this.run((s) => s.clearLoginFailures(key));
  }

  get(key: string): Promise<string | undefined> {
    return this.run((s) => s.get(key));
  }

  set(key: string, json: string, ttlMs?: number, scope?: StateScope): Promise<void> {
    return this.run((s) => s.set(key, json, ttlMs, scope));
  }

  incr(key: string, by: number, ttlMs?: number, scope?: StateScope): Promise<number> {
    return this.run((s) => s.incr(key, by, ttlMs, scope));
  }

  status(): StateStatus {
    return { backend: 'redis', shared: !this.degradedSince, degraded: !!this.degradedSince, since: this.degradedSince, reason: this.reason, localOperations: this.localOperations };
  }

  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.probeTimer);
    await this.primary.close();
    await this.local.close();
  }

  private async run<T>(op: (store: StateStore) => Promise<T>): Promise<T> {
    if (!this.degradedSince) {
      try {
        return await op(this.primary);
      } catch (err) {
        this.failed(err);
      }
    }
    this.localOperations++;
    return op(this.local);
  }

  /** The client saw its connection fail: turn degraded now, not at the next call (status stays true when idle). */
  connectionLost(reason: string): void {
    this.degrade(reason);
  }

  /** A script's own error (a value that is not an integer, a full scope) is the caller's; anything else means Redis is not usable now. */
  private failed(err: unknown): void {
    if (err instanceof StateTypeError || err instanceof StateFullError) throw err;
    this.degrade((err as Error)?.message ?? String(err));
  }

  private degrade(reason: string): void {
    if (this.degradedSince || this.closed) return;
    this.degradedSince = Date.now();
    this.reason = reason;
    // A Redis that flaps (slow, answering the probe but not the next call) is probed ever less often
    // instead of logging a warn/info pair every 200 ms; one that held for a minute starts afresh.
    if (this.degradedSince - this.recoveredAt > 60_000) this.probeDelay = this.options.minProbeMs ?? 200;
    this.logger.warn({ reason }, 'state: Redis is unreachable; limits are per instance until it is back (relaying goes on)');
    this.scheduleProbe();
  }

  private scheduleProbe(): void {
    if (this.closed) return;
    const delay = this.probeDelay + Math.floor(Math.random() * (this.probeDelay / 4));
    this.probeDelay = Math.min(this.probeDelay * 2, this.options.maxProbeMs ?? 5000);
    this.probeTimer = setTimeout(() => void this.probe(), delay);
    this.probeTimer.unref();
  }

  private async probe(): Promise<void> {
    try {
      await this.primary.ping();
      const written = await this.writeBack();
      const since = this.degradedSince ?? Date.now();
      this.degradedSince = null;
      this.reason = null;
      this.recoveredAt = Date.now();
      this.logger.info({ degradedMs: Date.now() - since, localOperations: this.localOperations, quotaWrittenBack: written }, 'state: Redis is back; limits are shared again');
    } catch (err) {
      this.reason = (err as Error)?.message ?? String(err);
      this.scheduleProbe();
    }
  }

  /** Hands Redis what the instance did with quotas meanwhile. A failure leaves the rest for the next probe. */
  private async writeBack(): Promise<number> {
    let written = 0;
    for (const [slot, r] of this.reserved) {
      await this.primary.absorbQuota(r.key, r.id, r.amount, r.at, r.windowMs);
      this.reserved.delete(slot);
      written++;
    }
    for (const [slot, r] of this.released) {
      await this.primary.releaseQuota(r.key, r.id);
      this.released.delete(slot);
      written++;
    }
    return written;
  }

  private remember<T>(map: Map<string, T>, slot: string, value: T): void {
    if (map.size >= (this.options.maxPending ?? 100_000)) map.delete(map.keys().next().value!);
    map.set(slot, value);
  }
}
