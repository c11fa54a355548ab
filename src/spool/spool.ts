// Store and forward: takes custody of a message no downstream accepted for now (durable before the
// client hears `250 Queued`), retries it through the user's current selector with back-off, and moves
// it to the dead letter after max_age or a permanent refusal. It calls route.ts as the SMTP session does.
import type { QueueConfig, SpoolConfig } from '../config/load';
import type { Envelope } from '../delivery/pool';
import { SmtpMuxError } from '../errors';
import { MessageBody } from '../message/body';
import { summarize } from '../message/summary';
import type { Logger } from '../observe/logger';
import type { Metrics } from '../observe/metrics';
import { routeMessage } from '../route';
import type { Runtime } from '../runtime';
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import { buildBounce } from './dsn';
import { retryDelay } from './schedule';
import { SpoolStore, type SpoolEntry, type SpoolStats } from './store';

/** Retry settings for a message whose user no longer has `queue` (or is gone): the documented defaults. */
export const DEFAULT_QUEUE: QueueConfig = Object.freeze({ maxAgeMs: 3 * 86_400_000, firstRetryMs: 30_000, maxRetryMs: 3_600_000, bounce: false });

/**
 * Whether a message answered with `error` is one to queue: nothing accepted it for now because of the
 * downstreams (4.4.x: they failed temporarily, or every one was cooling, rate-limited or out of quota).
 * A permanent refusal stays a 5xx; a selector fault (4.3.0) is the script's to fix, not a reason to hold mail.
 */
export function isQueueable(error: SmtpMuxError): boolean {
  return error.responseCode >= 400 && error.responseCode < 500 && error.enhanced.startsWith('4.4.');
}

export interface SpoolDeps {
  /** The Runtime retries use: the current one, so a reload's new selector applies to the next retry. */
  current(): Runtime;
  readonly logger: Logger;
  /** Retries count their attempts and selector runs like live messages. */
  readonly metrics: Metrics;
  /** True once shutdown began: no new retry starts. */
  closing?(): boolean;
  readonly now?: () => number;
}

/** Monotonic counts since start, for metrics: what entered, left and died. */
export interface SpoolCounters {
  queued: number;
  delivered: number;
  dead: number;
  retries: number;
  /** Attempts a crash interrupted (each may have been accepted and is sent again). */
  interrupted: number;
  /** Delivery status notifications queued for the senders of dead messages. */
  bounces: number;
}

export interface Custody {
  readonly id: string;
  readonly user: string;
  readonly envelope: Envelope;
  readonly clientAddress: string;
  readonly queue: QueueConfig;
  readonly body: MessageBody;
  /** What the live attempt ended with, for `queue list`/`show`. */
  readonly lastError: string;
}

export class Spool {
  readonly counters: SpoolCounters = { queued: 0, delivered: 0, dead: 0, retries: 0, interrupted: 0, bounces: 0 };
  private readonly active = new Set<Promise<void>>();
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  /** Bytes of messages being written now, counted against max_size before their row exists. */
  private pendingBytes = 0;
  private readonly now: () => number;

  private constructor(
    readonly config: SpoolConfig,
    readonly store: SpoolStore,
    private readonly deps: SpoolDeps,
  ) {
    this.now = deps.now ?? Date.now;
  }

  /** Opens the spool and finishes what a crash left (interrupted attempts are logged); does not retry yet. */
  static async open(config: SpoolConfig, deps: SpoolDeps): Promise<Spool> {
    const store = await SpoolStore.open(config.dir, { serving: true });
    const spool = new Spool(config, store, deps);
    try {
      const recovery = await store.recover(spool.now());
      const log = deps.logger;
      for (const id of recovery.interrupted) {
        spool.counters.interrupted++;
        log.warn(
          { msgId: id, possibleDuplicate: true },
          'a delivery attempt of this queued message was in progress when SMTP Mux stopped: if the downstream had accepted it, the retry sends a second copy (at-least-once)',
        );
      }
      for (const id of recovery.missingBodies) log.error({ msgId: id }, 'queued message has no body file: moved to the dead letter');
      if (recovery.orphans > 0) log.info({ files: recovery.orphans }, 'removed body files of messages that were never queued (a write interrupted by a stop)');
      const stats = store.stats();
      log.info({ dir: config.dir, queued: stats.queued, dead: stats.dead, bytes: stats.bytes }, 'spool open');
    } catch (err) {
      store.close();
      throw err;
    }
    return spool;
  }

  /** Starts retrying: due messages are looked for every poll_interval (which also picks up `queue retry`). */
  start(): void {
    if (this.timer || this.stopped) return;
    this.timer = setInterval(() => this.tick(), this.config.pollIntervalMs);
    this.timer.unref();
    this.tick();
  }

  stats(): SpoolStats {
    return this.store.stats();
  }

  /**
   * Takes custody of a message: durable on disk when this resolves (the caller may then answer 250).
   * Rejects with SMTPMUX_SPOOL_FULL past max_size and SMTPMUX_SPOOL_FAILED when the write failed; then
   * nothing of the message is kept and the client's retry is its copy.
   */
  async keep(message: Custody): Promise<string> {
    const log = this.deps.logger.child({ msgId: message.id, user: message.user });
    const size = message.body.size;
    const held = this.store.stats().bytes + this.pendingBytes;
    const { maxSize } = this.settings();
    if (held + size > maxSize) {
      log.warn({ size, held, maxSize }, 'spool full: message not queued');
      throw new SmtpMuxError('SMTPMUX_SPOOL_FULL', `${held} of ${maxSize} bytes held`);
    }
    this.pendingBytes += size;
    const now = this.now();
    const nextAt = now + retryDelay(1, message.queue);
    try {
      await this.store.add(
        {
          id: message.id,
          user: message.user,
          envelope: { from: message.envelope.from, to: message.envelope.to, use8BitMime: message.envelope.use8BitMime },
          size,
          clientAddress: message.clientAddress,
          headers: message.body.headerBlock,
          queuedAt: now,
          expiresAt: now + message.queue.maxAgeMs,
          nextAt,
          attempts: 1,
          lastError: message.lastError,
        },
        message.body.open(),
      );
    } catch (err) {
      log.error({ err: (err as Error).message }, 'message could not be queued');
      throw new SmtpMuxError('SMTPMUX_SPOOL_FAILED');
    } finally {
      this.pendingBytes -= size;
    }
    this.counters.queued++;
    log.info({ size, nextRetry: new Date(nextAt).toISOString() }, 'message queued');
    return message.id;
  }

  /** Stops retrying and waits for retries in flight (up to `graceMs`), then closes the database. */
  async close(graceMs = 30_000): Promise<void> {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    const deadline = new Promise<void>((resolve) => setTimeout(resolve, graceMs).unref());
    await Promise.race([Promise.allSettled([...this.active]), deadline]);
    // A retry still running now finds the database closed; its row keeps its lease, so the next start
    // logs it as interrupted and sends it again.
    this.store.close();
  }

  /**
   * Queues a delivery status notification to a dead message's sender, from the null sender, as a message
   * of the same user: it is retried like any other and, should it die too, never bounces.
   */
  private async queueBounce(original: SpoolEntry, report: { status: string; diagnostic: string; now: number; reportingMta: string }): Promise<void> {
    const body = buildBounce({ original, ...report });
    const id = `${report.now.toString(36)}${randomBytes(4).toString('hex')}`.toUpperCase();
    const headerEnd = body.indexOf('\r\n\r\n');
    const queue = this.deps.current().config.users.find((u) => u.email.toLowerCase() === original.user.toLowerCase())?.queue ?? DEFAULT_QUEUE;
    const log = this.deps.logger.child({ msgId: id, user: original.user });
    try {
      await this.store.add(
        {
          id,
          user: original.user,
          envelope: { from: '', to: [original.envelope.from], use8BitMime: body.some((byte) => byte > 0x7f) },
          size: body.length,
          clientAddress: '',
          headers: body.subarray(0, headerEnd).toString('utf8'),
          queuedAt: report.now,
          expiresAt: report.now + queue.maxAgeMs,
          nextAt: report.now,
          attempts: 0,
          lastError: '',
        },
        body,
      );
      this.counters.bounces++;
      log.info({ bounceOf: original.id, to: original.envelope.from, status: report.status }, 'bounce queued for the sender of a dead message');
    } catch (err) {
      log.error({ bounceOf: original.id, err: (err as Error).message }, 'the bounce could not be queued');
    }
  }

  /** max_size and concurrency follow a reload; dir and poll_interval are fixed at open. */
  private settings(): SpoolConfig {
    return this.deps.current().config.spool ?? this.config;
  }

  private tick(): void {
    if (this.stopped || this.deps.closing?.()) return;
    const free = this.settings().concurrency - this.active.size;
    if (free <= 0) return;
    let due: SpoolEntry[];
    try {
      due = this.store.due(this.now(), free);
    } catch (err) {
      this.deps.logger.error({ err: (err as Error).message }, 'spool: could not read the schedule');
      return;
    }
    for (const entry of due) {
      if (this.stopped || this.deps.closing?.()) return;
      const run = this.retry(entry).catch((err: Error) => this.deps.logger.error({ msgId: entry.id, err: String(err?.stack ?? err) }, 'spool: retry failed unexpectedly; the message stays queued'));
      this.active.add(run);
      void run.finally(() => {
        this.active.delete(run);
        // A backlog drains without waiting for the next poll.
        if (due.length === free) setImmediate(() => this.tick());
      });
    }
  }

  /** One retry of one queued message: lease, route, then remove, reschedule or bury. */
  private async retry(entry: SpoolEntry): Promise<void> {
    const started = this.now();
    if (!this.store.lease(entry.id, started)) return; // dropped or taken meanwhile
    this.counters.retries++;
    const attempt = entry.attempts + 1;
    const runtime = this.deps.current();
    const release = runtime.acquire();
    const log = this.deps.logger.child({ msgId: entry.id, user: entry.user });
    try {
      const user = runtime.user(entry.user);
      const queue = runtime.config.users.find((u) => u.email.toLowerCase() === entry.user.toLowerCase())?.queue ?? DEFAULT_QUEUE;
      // The current config's max_age applies (a reload may have changed it); a user gone keeps the old one.
      const expiresAt = user ? entry.queuedAt + queue.maxAgeMs : entry.expiresAt;
      let error: SmtpMuxError | null;
      let downstream: string | undefined;
      if (!user) {
        error = new SmtpMuxError('SMTPMUX_USER_GONE', 'the user of this queued message is no longer configured');
      } else {
        const envelope: Envelope = { ...entry.envelope, size: entry.size };
        const message = summarize(
          { id: entry.id, user: user.email, from: entry.envelope.from, to: entry.envelope.to, size: entry.size, clientAddress: entry.clientAddress, attempt, queuedAt: new Date(entry.queuedAt).toISOString() },
          entry.headers,
        );
        const body = MessageBody.fromFile(this.store.bodyPath(entry.id), entry.size, entry.headers);
        ({ error, downstream } = await routeMessage(runtime, user, message, envelope, body, this.deps.logger, this.deps.metrics));
      }
      const now = this.now();
      const queuedFor = Math.round((now - entry.queuedAt) / 1000);
      if (!error) {
        await this.store.delivered(entry.id);
        this.counters.delivered++;
        log.info({ attempt, downstream, queuedForSeconds: queuedFor }, 'queued message delivered');
        return;
      }
      const lastError = error.message;
      if (error.responseCode >= 500 || now >= expiresAt) {
        const reason = error.responseCode >= 500 ? 'refused permanently' : 'max_age reached';
        this.store.bury(entry.id, { reason, at: now, attempts: attempt, lastError });
        this.counters.dead++;
        log.error({ attempt, reason, lastError, queuedForSeconds: queuedFor }, 'queued message moved to the dead letter');
        // Never a bounce for a bounce (null sender), nor for a user gone from the config.
        if (user && queue.bounce && entry.envelope.from !== '') {
          await this.queueBounce(entry, { status: error.responseCode >= 500 ? error.enhanced : '4.4.7', diagnostic: lastError, now, reportingMta: runtime.config.hostname ?? os.hostname() });
        }
        return;
      }
      const nextAt = Math.min(now + retryDelay(attempt, queue), expiresAt);
      this.store.reschedule(entry.id, { nextAt, attempts: attempt, lastError, expiresAt });
      log.info({ attempt, nextRetry: new Date(nextAt).toISOString(), lastError }, 'queued message not delivered yet; retrying later');
    } finally {
      release();
    }
  }
}
