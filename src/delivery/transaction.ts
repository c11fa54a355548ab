// One message's delivery: the attempts, the exactly-once `delivered` latch and the final verdict.
// Attempts run one at a time, so two send() calls can never both deliver the message.
import { SmtpMuxError, SEND_CODES, type SendCode } from '../errors';
import type { MessageBody } from '../message/body';
import type { DownstreamView, SelectorOutcome, SendRecord } from '../selector/types';
import type { DownstreamPool, Envelope } from './pool';

export interface DeliveryTarget {
  readonly view: DownstreamView;
  /** The downstream's pool, or anything that answers like one (`smtpmux try` simulates). */
  readonly pool: Pick<DownstreamPool, 'send'>;
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

export interface Verdict {
  readonly delivered: boolean;
  /** null: accepted, answer 250. */
  readonly error: SmtpMuxError | null;
  readonly downstream?: string;
}

export class Delivery {
  readonly attempts: AttemptLog[] = [];
  /** Script mistakes at the bridge (unknown downstream, too many sends), for the log line. */
  readonly problems: string[] = [];
  delivered: { downstream: string; response: string; rejected: readonly string[] } | undefined;
  private chain: Promise<unknown> = Promise.resolve();
  private scriptSends = 0;

  constructor(
    private readonly body: Pick<MessageBody, 'open'>,
    private readonly envelope: Envelope,
    private readonly targets: ReadonlyMap<string, DeliveryTarget>,
    private readonly maxSends: number,
  ) {}

  /** The send() bridge: one attempt, after any attempt already in flight; never rejects. */
  send(target: string | null, fromScript = true): Promise<SendRecord> {
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

  private async attempt(target: string | null, fromScript: boolean): Promise<SendRecord> {
    const started = Date.now();
    if (this.delivered) return this.refuse(target, 'SMTPMUX_ALREADY_DELIVERED', started);
    if (fromScript && ++this.scriptSends > this.maxSends) return this.refuse(target, 'SMTPMUX_SEND_LIMIT', started, ` (limit ${this.maxSends})`);
    const found = target === null ? undefined : this.targets.get(target);
    if (!found) return this.refuse(target, 'SMTPMUX_UNKNOWN_DOWNSTREAM', started, target === null ? ': send() needs a downstream object or name' : `: "${target}"`);

    const name = found.view.name;
    const result = await found.pool.send(this.envelope, this.body.open());
    const ms = Date.now() - started;
    if (result.ok) {
      // The latch: from here on the client's answer is 250, whatever the script does next.
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

  private refuse(target: string | null, code: SendCode, started: number, detail = ''): SendRecord {
    const message = `${SEND_CODES[code]}${detail}`;
    if (this.problems.length < 20) this.problems.push(message);
    return { ok: false, downstream: target, code, permanent: code !== 'SMTPMUX_SEND_LIMIT', message, ms: Date.now() - started };
  }

  /** The one SMTP answer for this message, from the latch, the attempts and how the selector ended. */
  verdict(outcome: SelectorOutcome): Verdict {
    if (this.delivered) return { delivered: true, error: null, downstream: this.delivered.downstream };
    if (outcome.kind === 'fault' && outcome.fault !== 'threw' && outcome.fault !== 'bad-result') {
      const code = outcome.fault === 'timeout' ? 'SMTPMUX_SELECTOR_TIMEOUT' : outcome.fault === 'memory' ? 'SMTPMUX_SELECTOR_MEMORY' : 'SMTPMUX_SELECTOR_UNAVAILABLE';
      return { delivered: false, error: new SmtpMuxError(code) };
    }
    if (this.attempts.length === 0) {
      if (outcome.kind === 'fault' && outcome.fault === 'threw') return { delivered: false, error: new SmtpMuxError('SMTPMUX_SELECTOR_FAILED') };
      return { delivered: false, error: new SmtpMuxError('SMTPMUX_SELECTOR_BAD_RESULT') };
    }
    const summary = this.attempts.map((a) => `${a.downstream}: ${a.responseCode ?? a.code}`).join(', ');
    const last = this.attempts[this.attempts.length - 1];
    if (this.attempts.every((a) => a.permanent)) {
      // Pass the downstream's own reply through: it says best why the message was refused.
      const reply = last.responseCode ?? 554;
      const enhanced = /^\d{3}[ -](5\.\d{1,3}\.\d{1,3})\b/.exec(last.response ?? '')?.[1] ?? '5.0.0';
      return { delivered: false, error: new SmtpMuxError('SMTPMUX_DOWNSTREAM_REJECTED', summary, { reply, enhanced }) };
    }
    return { delivered: false, error: new SmtpMuxError('SMTPMUX_DOWNSTREAMS_UNAVAILABLE', summary) };
  }
}
