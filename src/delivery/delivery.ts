// One message's delivery: its attempts and the exactly-once `delivered` latch. Attempts run one at a
// time, so two send() calls can never both deliver the message. It knows nothing of who asks (a selector
// script, an ordered list, `smtpmux try`): it performs attempts and reports them; the verdict from those
// attempts and how the selector ended lives with the routing (src/verdict.ts).
import type { DownstreamGate, SkipReason } from '../downstreams/gate';
import { rewriteFrom } from '../downstreams/from-rewrite';
import { SEND_CODES, type SendCode } from '../errors';
import type { MessageBody } from '../message/body';
import type { AttemptResult, DownstreamPool, Envelope } from './pool';

export interface DeliveryTarget {
  /** The downstream's name, as attempts and logs call it. */
  readonly name: string;
  /** The downstream's pool, or anything that answers like one (`smtpmux try` simulates). */
  readonly pool: Pick<DownstreamPool, 'send'>;
  /** Its health, rate and quota, consulted before each attempt; absent: always contacted. */
  readonly gate?: DownstreamGate;
  /** The verified address messages through it are sent from (From rewrite); absent: unchanged. */
  readonly from?: string;
}

export interface DeliveryOptions {
  /** The message's id: quota reservations are named after it. */
  readonly messageId: string;
  /** Attempts a caller may ask for with `fromScript` (limits.max_sends). */
  readonly maxSends: number;
  /** Wall-clock deadline of one attempt (delivery.attempt_timeout_ms). */
  readonly attemptTimeoutMs: number;
  /** How long an attempt may wait for a rate slot before the downstream is skipped (delivery.rate_wait_ms). */
  readonly rateWaitMs: number;
}

export interface AttemptLog {
  readonly downstream: string;
  readonly ok: boolean;
  readonly code?: string;
  readonly responseCode?: number;
  readonly permanent?: boolean;
  readonly response?: string;
  readonly ms: number;
  /** Not contacted: why, and until when (ISO time). */
  readonly skipped?: SkipReason;
  readonly until?: string;
  /** Every downstream it could use was cooling; this one, whose cooldown ends first, was tried anyway. */
  readonly probe?: true;
  /** This attempt put the downstream into cooldown until then (ISO time). */
  readonly coolingUntil?: string;
}

const SKIP_CODES: Record<SkipReason, SendCode> = {
  cooling: 'SMTPMUX_DOWNSTREAM_COOLING',
  rate: 'SMTPMUX_DOWNSTREAM_RATE',
  quota: 'SMTPMUX_DOWNSTREAM_QUOTA',
};

/** What one attempt came to: accepted, or why not (the send() bridge hands this to a script as is). */
export type AttemptRecord =
  | { ok: true; downstream: string; responseCode: number; response: string; ms: number }
  | { ok: false; downstream: string | null; code: string; responseCode?: number; response?: string; permanent: boolean; message: string; ms: number };

export class Delivery {
  readonly attempts: AttemptLog[] = [];
  /** Mistakes of the caller (unknown downstream, too many sends), for the log line. */
  readonly problems: string[] = [];
  delivered: { downstream: string; response: string; rejected: readonly string[] } | undefined;
  private chain: Promise<unknown> = Promise.resolve();
  private scriptSends = 0;
  /** The script's run ended without it (abandoned at its deadline, killed): sends it queued are not made. */
  private scriptOver = false;

  constructor(
    private readonly body: Pick<MessageBody, 'open'>,
    private readonly envelope: Envelope,
    private readonly targets: ReadonlyMap<string, DeliveryTarget>,
    private readonly options: DeliveryOptions,
  ) {}

  /**
   * One attempt, after any attempt already in flight; never rejects. `fromScript` counts it against
   * the send cap (an ordered list the host tries is bounded by the user's downstreams instead).
   */
  send(target: string | null, fromScript = true): Promise<AttemptRecord> {
    return this.enqueue(() => this.attempt(target, fromScript));
  }

  private enqueue<T>(step: () => Promise<T>): Promise<T> {
    const next = this.chain.then(step);
    this.chain = next;
    return next;
  }

  /**
   * Tries an ordered list (what a selector returned), stopping at the first downstream that accepts.
   * Downstreams that are cooling, at their rate or out of quota are skipped; when every one it reached
   * was skipped because it is cooling, the one whose cooldown ends first is probed.
   */
  async tryInOrder(names: readonly string[]): Promise<void> {
    const cooling: string[] = [];
    let other = false;
    for (const name of new Set(names)) {
      if (this.delivered) return;
      const record = await this.send(name, false);
      if (!record.ok && record.code === SKIP_CODES.cooling) cooling.push(name);
      else other = true;
    }
    if (!this.delivered && !other && cooling.length > 0) await this.enqueue(() => this.probeFirstToRecover(cooling));
  }

  /**
   * The script's run is over without it having finished (abandoned at its deadline, or its isolate
   * was killed): the attempt in flight runs to its end, and sends it queued behind it are refused,
   * so a client waits for one attempt, not for every send() an abandoned script fired.
   */
  endScript(): void {
    this.scriptOver = true;
  }

  /** Resolves once every attempt started so far has ended. */
  async settled(): Promise<void> {
    let seen: Promise<unknown>;
    do {
      seen = this.chain;
      await seen;
    } while (seen !== this.chain);
  }

  private async attempt(target: string | null, fromScript: boolean): Promise<AttemptRecord> {
    const started = Date.now();
    if (this.delivered) return this.refuse(target, 'SMTPMUX_ALREADY_DELIVERED', started);
    if (fromScript && this.scriptOver) return this.refuse(target, 'SMTPMUX_RUN_OVER', started);
    if (fromScript && ++this.scriptSends > this.options.maxSends) return this.refuse(target, 'SMTPMUX_SEND_LIMIT', started, ` (limit ${this.options.maxSends})`);
    const found = target === null ? undefined : this.targets.get(target);
    if (!found) return this.refuse(target, 'SMTPMUX_UNKNOWN_DOWNSTREAM', started, target === null ? ': send() needs a downstream object or name' : `: "${target}"`);

    const record = await this.contact(found, started, false);
    // A script's send() to a cooling downstream, when every downstream it could use is cooling and this
    // one recovers first: a probe, so the proxy heals itself.
    if (fromScript && !record.ok && record.code === SKIP_CODES.cooling && (await this.firstToRecover([...new Set(this.targets.values())])) === found) {
      this.attempts.pop();
      return this.contact(found, started, true);
    }
    return record;
  }

  /** Probes the target among `names` whose cooldown ends first, if every one is still cooling. */
  private async probeFirstToRecover(names: readonly string[]): Promise<void> {
    if (this.delivered) return;
    const targets = names.map((n) => this.targets.get(n)).filter((t): t is DeliveryTarget => t !== undefined);
    const first = await this.firstToRecover(targets);
    if (!first) return;
    const before = this.attempts.length;
    const record = await this.contact(first, Date.now(), true);
    // A probe not let through is the same skip the list already recorded: keep one line of it.
    if (!record.ok && record.code === SKIP_CODES.cooling) this.attempts.length = before;
  }

  /** The target whose cooldown ends first, when every one of `targets` is cooling; else undefined. */
  private async firstToRecover(targets: readonly DeliveryTarget[]): Promise<DeliveryTarget | undefined> {
    let first: { target: DeliveryTarget; until: number } | undefined;
    for (const target of targets) {
      const until = target.gate ? (await target.gate.health()).cooldownUntil : null;
      if (until === null) return undefined;
      if (!first || until < first.until) first = { target, until };
    }
    return first?.target;
  }

  /** Admission by the downstream's gate, then the attempt itself, recorded in `attempts`. */
  private async contact(found: DeliveryTarget, started: number, probe: boolean): Promise<AttemptRecord> {
    const name = found.name;
    const gate = found.gate;
    const admission = gate
      ? await gate.admit({ id: `${this.options.messageId}.${this.attempts.length}`, recipients: this.envelope.to.length, maxWaitMs: this.options.rateWaitMs, probe })
      : undefined;
    if (admission && !admission.ok) {
      const code = SKIP_CODES[admission.reason];
      const until = new Date(admission.until).toISOString();
      this.attempts.push({ downstream: name, ok: false, code, permanent: false, skipped: admission.reason, until, ms: Date.now() - started });
      return { ok: false, downstream: name, code, permanent: false, message: `${name}: ${SEND_CODES[code]}: ${admission.detail}`, ms: Date.now() - started };
    }
    let result: AttemptResult;
    try {
      result = await this.attemptVia(found);
    } catch (err) {
      // Only the From rewrite can throw here (a spilled body whose header block cannot be found).
      result = { ok: false, code: 'ESTREAM', permanent: true, backoff: false, message: String((err as Error)?.message ?? err) };
    }
    const ms = Date.now() - started;
    const settled = gate && admission?.ok ? await gate.settle(admission, result.ok ? null : result) : null;
    const marks = {
      ...(admission?.ok && admission.probe ? { probe: true as const } : {}),
      ...(settled?.cooldownUntil ? { coolingUntil: new Date(settled.cooldownUntil).toISOString() } : {}),
    };
    if (result.ok) {
      // The latch: from here on the client's answer is 250, whatever the caller does next.
      this.delivered = { downstream: name, response: result.response, rejected: result.rejected };
      this.attempts.push({ downstream: name, ok: true, responseCode: result.responseCode, ms, ...marks });
      return { ok: true, downstream: name, responseCode: result.responseCode, response: result.response, ms };
    }
    this.attempts.push({ downstream: name, ok: false, code: result.code, responseCode: result.responseCode, permanent: result.permanent, response: result.response, ms, ...marks });
    return {
      ok: false,
      downstream: name,
      code: result.code,
      responseCode: result.responseCode,
      response: result.response,
      permanent: result.permanent,
      message: `${name}: ${result.message}`,
      ms,
    };
  }

  /** One attempt over the target's pool, with the From rewrite when it has one. */
  private async attemptVia(target: DeliveryTarget): Promise<AttemptResult> {
    const timeout = { timeoutMs: this.options.attemptTimeoutMs };
    if (target.from === undefined) return target.pool.send(this.envelope, this.body.open(), timeout);
    const rewritten = await rewriteFrom(this.body.open(), this.envelope.size, target.from);
    // A null sender (a bounce) stays null: giving it a real address could start a mail loop.
    const envelope = { ...this.envelope, from: this.envelope.from === '' ? '' : target.from, size: rewritten.size };
    return target.pool.send(envelope, rewritten.raw, timeout);
  }

  private refuse(target: string | null, code: SendCode, started: number, detail = ''): AttemptRecord {
    const message = `${SEND_CODES[code]}${detail}`;
    if (this.problems.length < 20) this.problems.push(message);
    return { ok: false, downstream: target, code, permanent: code !== 'SMTPMUX_SEND_LIMIT', message, ms: Date.now() - started };
  }
}
