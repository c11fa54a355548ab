// What the host knows about one downstream and enforces before each attempt: its health (failures,
// cooldown after a back-off signal, doubling while it keeps failing), its rate (smooth pacing, a short
// wait for a slot) and its quota (a rolling window charged only for accepted deliveries). All of it
// lives behind the StateStore, one atomic operation per step, so a shared backend can hold it for
// several instances; only what is about this process (attempts in flight, the last probe) stays here.
import type { DownstreamConfig, Period } from '../config/load';
import type { DownstreamStatus } from '../selector/types';
import { keyPart, type HealthSnapshot, type LastError, type StateStore } from '../state/store';

/** Why an attempt was not made. */
export type SkipReason = 'cooling' | 'rate' | 'quota';

export type Admission =
  | { readonly ok: true; readonly probe: boolean; readonly quotaId?: string; readonly health: HealthSnapshot }
  | { readonly ok: false; readonly reason: SkipReason; readonly until: number; readonly detail: string };

/** A failed attempt as far as health goes. */
export interface FailureFacts {
  readonly code: string;
  readonly response?: string;
  /** A back-off signal (connection refused or timed out, 421, 454, 4.7.x, quota, login refused). */
  readonly backoff: boolean;
  /** The downstream refused the message itself (5xx to MAIL/RCPT/DATA): it is up, nothing to record. */
  readonly permanent: boolean;
}

export interface GatePolicy {
  readonly rate?: Period;
  readonly quota?: Period;
  readonly count: 'messages' | 'recipients';
  readonly cooldown?: { readonly baseMs: number; readonly maxMs: number };
}

/**
 * The key a downstream's state lives under. By default per user and downstream name: a quota belongs to
 * the account the user logs in to the downstream with, and two users of SMTP Mux rarely share one. When
 * they do (one SES account behind two logins), `account:` names the shared key.
 */
export function stateKey(user: string, ds: Pick<DownstreamConfig, 'name' | 'account'>): string {
  // Both parts escaped: user "a:b" with downstream "c" is never user "a" with downstream "b:c".
  return ds.account !== undefined ? `account:${keyPart(ds.account)}` : `user:${keyPart(user.toLowerCase())}:${keyPart(ds.name)}`;
}

/** Longest reply text kept as a downstream's last error. */
const MAX_REPLY = 300;

export class DownstreamGate {
  private inflight = 0;
  private probing = false;
  /** When this process last contacted the downstream (start or end of an attempt): probes are at least one base cooldown after it. */
  private lastContact = 0;

  constructor(
    readonly key: string,
    readonly policy: GatePolicy,
    private readonly store: StateStore,
    private readonly now: () => number = Date.now,
  ) {}

  /** True when the config asks for anything beyond keeping failures for selectors to see. */
  get limited(): boolean {
    return this.policy.rate !== undefined || this.policy.quota !== undefined || this.policy.cooldown !== undefined;
  }

  amountFor(recipients: number): number {
    return this.policy.count === 'recipients' ? Math.max(1, recipients) : 1;
  }

  health(): Promise<HealthSnapshot> {
    return this.store.health(this.key);
  }

  /**
   * May an attempt be made now? Checks cooling, reserves quota under `id`, takes a rate slot (waiting up
   * to `maxWaitMs` for one). `probe`: the caller found every downstream it could use cooling and picked
   * this one, whose cooldown ends first; it is let through when no probe of it is in flight and the last
   * contact is at least one base cooldown ago, so a downstream that is down costs one message now and
   * then, not every message.
   */
  async admit(options: { readonly id: string; readonly recipients: number; readonly maxWaitMs: number; readonly probe?: boolean }): Promise<Admission> {
    const health = await this.store.health(this.key);
    const now = this.now();
    let probe = false;
    if (health.cooldownUntil !== null) {
      const base = this.policy.cooldown?.baseMs ?? 0;
      if (!options.probe || this.probing || now - this.lastContact < base) {
        return { ok: false, reason: 'cooling', until: health.cooldownUntil, detail: `cooling down until ${iso(health.cooldownUntil)}${lastErrorText(health.lastError)}` };
      }
      probe = true;
    }
    const amount = this.amountFor(options.recipients);
    let quotaId: string | undefined;
    const { quota, rate } = this.policy;
    if (quota) {
      const grant = await this.store.reserveQuota(`${this.key}:quota`, options.id, amount, quota.limit, quota.periodMs);
      if (!grant.ok) {
        const until = grant.resetsAt ?? now + quota.periodMs;
        return { ok: false, reason: 'quota', until, detail: `quota of ${quota.limit} per ${describePeriod(quota.periodMs)} used up (${grant.used} used) until ${iso(until)}` };
      }
      quotaId = options.id;
    }
    if (rate) {
      const grant = await this.store.acquireRate(`${this.key}:rate`, rate.limit, rate.periodMs, options.maxWaitMs, amount);
      if (!grant.ok) {
        if (quotaId) await this.store.releaseQuota(`${this.key}:quota`, quotaId);
        const until = this.now() + grant.retryInMs;
        return { ok: false, reason: 'rate', until, detail: `at its rate of ${rate.limit} per ${describePeriod(rate.periodMs)}; next slot at ${iso(until)}` };
      }
      if (grant.waitMs > 0) await new Promise((resolve) => setTimeout(resolve, grant.waitMs));
    }
    if (probe) this.probing = true;
    this.inflight++;
    this.lastContact = this.now();
    return { ok: true, probe, quotaId, health };
  }

  /**
   * Records how an admitted attempt ended: success clears failures and cooldown and keeps the quota
   * charge; a failure gives the quota back and counts against health, cooling the downstream on a
   * back-off signal. Returns the cooldown it started, if any.
   */
  async settle(admission: Extract<Admission, { ok: true }>, failure: FailureFacts | null): Promise<{ cooldownUntil: number | null; failures: number } | null> {
    this.inflight--;
    this.lastContact = this.now();
    if (admission.probe) this.probing = false;
    if (!failure) {
      // A round trip saved on the common path: only a downstream with a record has one to clear.
      if (admission.health.failures > 0 || admission.health.cooldownUntil !== null) await this.store.recordSuccess(this.key);
      return null;
    }
    if (admission.quotaId) await this.store.releaseQuota(`${this.key}:quota`, admission.quotaId);
    if (failure.permanent && !failure.backoff) return null;
    const error: LastError = { code: failure.code, response: failure.response?.slice(0, MAX_REPLY), at: this.now() };
    const cooldown = failure.backoff && this.policy.cooldown ? this.policy.cooldown : null;
    const health = await this.store.recordFailure(this.key, error, cooldown);
    return { cooldownUntil: cooldown ? health.cooldownUntil : null, failures: health.failures };
  }

  /** The snapshot a selector sees. */
  async view(): Promise<DownstreamStatus> {
    const { quota, rate } = this.policy;
    const [health, usage, available] = await Promise.all([
      this.store.health(this.key),
      quota ? this.store.quotaUsage(`${this.key}:quota`, quota.periodMs) : undefined,
      rate ? this.store.rateAvailable(`${this.key}:rate`, rate.limit, rate.periodMs) : undefined,
    ]);
    return {
      state: health.cooldownUntil !== null ? 'cooling' : 'up',
      cooldownUntil: health.cooldownUntil,
      failures: health.failures,
      lastError: health.lastError ? { code: health.lastError.code, response: health.lastError.response ?? null } : null,
      quota: quota && usage ? { limit: quota.limit, used: usage.used, remaining: Math.max(0, quota.limit - usage.used), resetsAt: usage.resetsAt } : null,
      rate: rate && available !== undefined ? { limit: rate.limit, per: rate.periodMs, available } : null,
      inflight: this.inflight,
    };
  }
}

function iso(ms: number): string {
  return new Date(ms).toISOString();
}

function lastErrorText(error: LastError | null): string {
  if (!error) return '';
  return ` after ${error.response ? error.response.replace(/\s+/g, ' ').slice(0, 120) : error.code}`;
}

export function describePeriod(ms: number): string {
  for (const [unit, size] of [['d', 86_400_000], ['h', 3_600_000], ['m', 60_000], ['s', 1000]] as const) {
    if (ms % size === 0) return ms === size ? unit : `${ms / size}${unit}`;
  }
  return `${ms}ms`;
}
