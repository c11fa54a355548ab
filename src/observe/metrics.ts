// The Prometheus metrics of one App: one prom-client Registry per App, passed explicitly to what counts
// (never prom-client's global registry, so two Apps in one process, as in the tests, never share a
// counter). Label values come from the config only (user logins, downstream names, selector files) or
// from small fixed sets, never from what a client sends.
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { StateStatus } from '../state/store';
import { RecentActivity } from './recent';

/** How a message ended for the client: 250, 4xx, 5xx (and, once a spool exists, stored for later). */
export type MessageOutcome = 'delivered' | 'deferred' | 'rejected' | 'queued';
export const MESSAGE_OUTCOMES: readonly MessageOutcome[] = ['delivered', 'deferred', 'rejected', 'queued'];

/** What the spool holds and what it did since start, read at scrape time (see src/spool/spool.ts). */
export interface SpoolReading {
  readonly queued: number;
  readonly dead: number;
  readonly bytes: number;
  /** queued_at of the oldest queued message (ms since the epoch), or null. */
  readonly oldestQueuedAt: number | null;
  /** Counts since start: queued, delivered, dead, retries, interrupted, bounces. */
  readonly counters: Readonly<Record<string, number>>;
}

/** One delivery attempt: accepted, failed for now, refused for good, or not tried (a cooling downstream). */
export type AttemptResult = 'ok' | 'temporary' | 'permanent' | 'skipped';
export const ATTEMPT_RESULTS: readonly AttemptResult[] = ['ok', 'temporary', 'permanent', 'skipped'];

/** Why a login failed, from the error it was answered with: wrong credentials, plaintext AUTH where not allowed, an address locked out. */
const AUTH_FAILURE_REASONS: Readonly<Record<string, string>> = {
  SMTPMUX_AUTH_FAILED: 'credentials',
  SMTPMUX_AUTH_INSECURE: 'insecure',
  SMTPMUX_AUTH_LOCKED: 'locked',
};

/** An error code as a label value: SMTPMUX_TOO_MANY_CONNECTIONS → too_many_connections; anything else → other. */
function codeLabel(code: string): string {
  return /^SMTPMUX_[A-Z_]{1,60}$/.test(code) ? code.slice('SMTPMUX_'.length).toLowerCase() : 'other';
}

/** One configured downstream's state (cooldown, quota), from whoever keeps that state. */
export interface DownstreamState {
  readonly user: string;
  readonly downstream: string;
  /** False while the downstream cools down after failures. */
  readonly up: boolean;
  /** Until when it cools (ms since the epoch), when it does. */
  readonly cooldownUntil?: number;
  /** Failures in a row since its last success. */
  readonly failures?: number;
  /** The code of its last failure (ECONNECTION, a reply code...): never the reply text, which may name a recipient. */
  readonly lastErrorCode?: string;
  /** Its quota window, when it has a quota. */
  readonly quota?: { readonly used: number; readonly limit: number };
}

export interface MetricsSources {
  /** Inbound SMTP connections open now. */
  connections?(): number;
  /** The state of every configured downstream, read at scrape time. */
  downstreams?(): Promise<readonly DownstreamState[]> | readonly DownstreamState[];
  /** Which backend holds cooldowns, rates, quotas and ctx.state, and whether it is degraded. */
  state?(): StateStatus;
  /** The durable spool, when there is one. */
  spool?(): SpoolReading | undefined;
}

/** Seconds, for message and selector timings (a local delivery takes a few ms, a slow provider seconds). */
const MESSAGE_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];
const SELECTOR_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30];

export class Metrics {
  readonly registry = new Registry();
  /** Per (user, downstream): the last minutes' attempts, for the status page. */
  readonly recent = new RecentActivity();
  private sources: MetricsSources = {};

  private readonly messages = new Counter({
    name: 'smtpmux_messages_total',
    help: 'Messages whose DATA ended with a reply, by user and outcome (delivered 250, deferred 4xx, rejected 5xx).',
    labelNames: ['user', 'outcome'] as const,
    registers: [this.registry],
  });
  private readonly attempts = new Counter({
    name: 'smtpmux_delivery_attempts_total',
    help: 'Delivery attempts to downstreams, by downstream and result (ok, temporary, permanent, skipped).',
    labelNames: ['downstream', 'result'] as const,
    registers: [this.registry],
  });
  private readonly messageSeconds = new Histogram({
    name: 'smtpmux_message_duration_seconds',
    help: 'From the end of DATA to the reply: selector run plus delivery attempts.',
    labelNames: ['outcome'] as const,
    buckets: MESSAGE_BUCKETS,
    registers: [this.registry],
  });
  private readonly selectorSeconds = new Histogram({
    name: 'smtpmux_selector_duration_seconds',
    help: "One selector run, from the call to select() to its result (send() calls made by the script included).",
    buckets: SELECTOR_BUCKETS,
    registers: [this.registry],
  });
  private readonly authFailures = new Counter({
    name: 'smtpmux_auth_failures_total',
    help: 'Failed SMTP logins, by reason (credentials, insecure, locked).',
    labelNames: ['reason'] as const,
    registers: [this.registry],
  });
  private readonly connectionsRefused = new Counter({
    name: 'smtpmux_connections_refused_total',
    help: 'Inbound connections turned away at connect, by reason (too_many_connections, too_many_connections_from_address, address_locked).',
    labelNames: ['reason'] as const,
    registers: [this.registry],
  });
  private readonly reloads = new Counter({
    name: 'smtpmux_reloads_total',
    help: 'Config reloads after start-up, by result (ok, failed).',
    labelNames: ['result'] as const,
    registers: [this.registry],
  });
  private readonly selectorRestarts = new Counter({
    name: 'smtpmux_selector_restarts_total',
    help: 'Selector isolates thrown away and rebuilt because a run broke a limit, by selector file and reason.',
    labelNames: ['selector', 'reason'] as const,
    registers: [this.registry],
  });
  private readonly configInfo = new Gauge({
    name: 'smtpmux_config_info',
    help: 'Always 1; the hash label identifies the running config and selectors (credentials left out).',
    labelNames: ['hash'] as const,
    registers: [this.registry],
  });

  constructor(options: { defaultMetrics?: boolean } = {}) {
    const sources = (): MetricsSources => this.sources;
    new Gauge({
      name: 'smtpmux_connections',
      help: 'Inbound SMTP connections open now.',
      registers: [this.registry],
      collect() {
        const count = sources().connections?.();
        if (count !== undefined) this.set(count);
      },
    });
    // Both gauges read one snapshot per scrape: the second reuses what the first fetched.
    let pending: Promise<readonly DownstreamState[]> | undefined;
    const snapshot = (): Promise<readonly DownstreamState[]> => {
      pending ??= Promise.resolve(sources().downstreams?.() ?? []).finally(() => setImmediate(() => (pending = undefined)));
      return pending;
    };
    new Gauge({
      name: 'smtpmux_downstream_up',
      help: "Whether a user's downstream is being tried: 1 up, 0 cooling down after failures.",
      labelNames: ['user', 'downstream'] as const,
      registers: [this.registry],
      async collect() {
        this.reset();
        for (const ds of await snapshot()) this.set({ user: ds.user, downstream: ds.downstream }, ds.up ? 1 : 0);
      },
    });
    new Gauge({
      name: 'smtpmux_downstream_quota_remaining',
      help: "Deliveries (or recipients) left in a user's downstream's quota window (only downstreams with a quota).",
      labelNames: ['user', 'downstream'] as const,
      registers: [this.registry],
      async collect() {
        this.reset();
        for (const ds of await snapshot()) if (ds.quota) this.set({ user: ds.user, downstream: ds.downstream }, Math.max(0, ds.quota.limit - ds.quota.used));
      },
    });
    new Gauge({
      name: 'smtpmux_state_degraded',
      help: 'State backend (memory or redis): 1 while a shared backend is unreachable and limits are per instance.',
      labelNames: ['backend'] as const,
      registers: [this.registry],
      collect() {
        const status = sources().state?.();
        this.reset();
        if (status) this.set({ backend: status.backend }, status.degraded ? 1 : 0);
      },
    });
    new Counter({
      name: 'smtpmux_state_local_operations_total',
      help: 'State operations served by the local fallback because the shared backend was unreachable.',
      registers: [this.registry],
      collect() {
        const status = sources().state?.();
        this.reset();
        if (status) this.inc(status.localOperations);
      },
    });
    // The spool: one reading per scrape, shared by its four metrics like the downstream snapshot above.
    let reading: SpoolReading | undefined;
    let readAt = -1;
    const spool = (): SpoolReading | undefined => {
      const now = Date.now();
      if (now - readAt > 50) {
        reading = sources().spool?.();
        readAt = now;
      }
      return reading;
    };
    new Gauge({
      name: 'smtpmux_spool_messages',
      help: 'Messages in the spool, by state: queued (waiting for a retry) or dead (the dead letter).',
      labelNames: ['state'] as const,
      registers: [this.registry],
      collect() {
        this.reset();
        const now = spool();
        if (now) for (const state of ['queued', 'dead'] as const) this.set({ state }, now[state]);
      },
    });
    new Gauge({
      name: 'smtpmux_spool_bytes',
      help: 'Body bytes the spool holds, queued and dead (compare with spool.max_size).',
      registers: [this.registry],
      collect() {
        this.reset();
        const now = spool();
        if (now) this.set(now.bytes);
      },
    });
    new Gauge({
      name: 'smtpmux_spool_oldest_age_seconds',
      help: 'Age of the oldest queued message; 0 when nothing is queued.',
      registers: [this.registry],
      collect() {
        this.reset();
        const now = spool();
        if (now) this.set(now.oldestQueuedAt === null ? 0 : Math.max(0, (Date.now() - now.oldestQueuedAt) / 1000));
      },
    });
    new Counter({
      name: 'smtpmux_spool_events_total',
      help: 'What the spool did since start: queued, retries, delivered, dead, interrupted (attempts a crash cut short), bounces.',
      labelNames: ['event'] as const,
      registers: [this.registry],
      collect() {
        this.reset();
        const now = spool();
        if (now) for (const event of ['queued', 'retries', 'delivered', 'dead', 'interrupted', 'bounces']) this.inc({ event }, now.counters[event] ?? 0);
      },
    });
    if (options.defaultMetrics !== false) collectDefaultMetrics({ register: this.registry });
  }

  /** Where scrape-time values come from; set once the things they read exist. */
  setSources(sources: MetricsSources): void {
    this.sources = sources;
  }

  /**
   * Starts every configured user's and downstream's series at 0, so rate() and the status page see them
   * before the first message. Series of users or downstreams a reload removed stay (counters only grow).
   */
  declare(users: readonly { readonly email: string; readonly downstreams: readonly { readonly name: string }[] }[]): void {
    for (const user of users) {
      for (const outcome of MESSAGE_OUTCOMES) this.messages.inc({ user: user.email, outcome }, 0);
      for (const ds of user.downstreams) for (const result of ATTEMPT_RESULTS) this.attempts.inc({ downstream: ds.name, result }, 0);
    }
  }

  message(user: string, outcome: MessageOutcome, seconds: number): void {
    this.messages.inc({ user, outcome });
    this.messageSeconds.observe({ outcome }, seconds);
  }

  /** One delivery attempt of `user`'s message to the configured downstream `downstream`. */
  attempt(user: string, downstream: string, result: AttemptResult, ms: number): void {
    this.attempts.inc({ downstream, result });
    this.recent.record(user, downstream, result, ms);
  }

  selectorRun(seconds: number): void {
    this.selectorSeconds.observe(seconds);
  }

  /** A failed login, by the code of the error it was answered with (the SMTP session's auth_failure event). */
  authFailure(code: string): void {
    this.authFailures.inc({ reason: AUTH_FAILURE_REASONS[code] ?? codeLabel(code) });
  }

  /** A connection refused at connect, by the code it was answered with (the connection_refused event). */
  connectionRefused(code: string): void {
    this.connectionsRefused.inc({ reason: codeLabel(code) });
  }

  reload(result: 'ok' | 'failed'): void {
    this.reloads.inc({ result });
  }

  selectorRestart(selector: string, reason: string): void {
    this.selectorRestarts.inc({ selector, reason });
  }

  /** The running config's hash; the previous one's series goes. */
  config(hash: string): void {
    this.configInfo.reset();
    this.configInfo.set({ hash }, 1);
  }

  /** Messages so far by user and outcome, for the status page. */
  async messageCounts(): Promise<Map<string, Record<MessageOutcome, number>>> {
    const counts = new Map<string, Record<MessageOutcome, number>>();
    for (const { labels, value } of (await this.messages.get()).values) {
      const user = String(labels.user);
      const row = counts.get(user) ?? { delivered: 0, deferred: 0, rejected: 0, queued: 0 };
      row[labels.outcome as MessageOutcome] = value;
      counts.set(user, row);
    }
    return counts;
  }

  /** The Prometheus text exposition of everything above plus Node's process metrics. */
  exposition(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }
}
