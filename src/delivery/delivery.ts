// One message's delivery: its attempts and the exactly-once `delivered` latch. Attempts run one at a
// time, so two send() calls can never both deliver the message. It knows nothing of who asks (a selector
// script, an ordered list, `smtpmux try`): it performs attempts and reports them; the verdict from those
// attempts and how the selector ended lives with the routing (src/verdict.ts).
import { SEND_CODES, type SendCode } from '../errors';
import type { MessageBody } from '../message/body';
import type { DownstreamPool, Envelope } from './pool';

export interface DeliveryTarget {
  /** The downstream's name, as attempts and logs call it. */
  readonly name: string;
  /** The downstream's pool, or anything that answers like one (`smtpmux try` simulates). */
  readonly pool: Pick<DownstreamPool, 'send'>;
}

export interface DeliveryOptions {
  /** Attempts a caller may ask for with `fromScript` (limits.max_sends). */
  readonly maxSends: number;
  /** Wall-clock deadline of one attempt (delivery.attempt_timeout_ms). */
  readonly attemptTimeoutMs: number;
}

export interface AttemptLog {
  readonly downstream: string;
  readonly ok: boolean;
  readonly code?: string;
  readonly responseCode?: number;
  readonly permanent?: boolean;
  readonly response?: string;
  readonly ms: number;
}

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
    const next = this.chain.then(() => this.attempt(target, fromScript));
    this.chain = next;
    return next;
  }

  /** Tries an ordered list (what a selector returned), stopping at the first downstream that accepts. */
  async tryInOrder(names: readonly string[]): Promise<void> {
    for (const name of new Set(names)) {
      if (this.delivered) return;
      await this.send(name, false);
    }
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
    if (fromScript && ++this.scriptSends > this.options.maxSends) return this.refuse(target, 'SMTPMUX_SEND_LIMIT', started, ` (limit ${this.options.maxSends})`);
    const found = target === null ? undefined : this.targets.get(target);
    if (!found) return this.refuse(target, 'SMTPMUX_UNKNOWN_DOWNSTREAM', started, target === null ? ': send() needs a downstream object or name' : `: "${target}"`);

    const name = found.name;
    const result = await found.pool.send(this.envelope, this.body.open(), { timeoutMs: this.options.attemptTimeoutMs });
    const ms = Date.now() - started;
    if (result.ok) {
      // The latch: from here on the client's answer is 250, whatever the caller does next.
      this.delivered = { downstream: name, response: result.response, rejected: result.rejected };
      this.attempts.push({ downstream: name, ok: true, responseCode: result.responseCode, ms });
      return { ok: true, downstream: name, responseCode: result.responseCode, response: result.response, ms };
    }
    this.attempts.push({ downstream: name, ok: false, code: result.code, responseCode: result.responseCode, permanent: result.permanent, response: result.response, ms });
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

  private refuse(target: string | null, code: SendCode, started: number, detail = ''): AttemptRecord {
    const message = `${SEND_CODES[code]}${detail}`;
    if (this.problems.length < 20) this.problems.push(message);
    return { ok: false, downstream: target, code, permanent: code !== 'SMTPMUX_SEND_LIMIT', message, ms: Date.now() - started };
  }
}
