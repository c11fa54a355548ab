// The one SMTP answer for a message, from the delivery latch, the attempts and how the selector ended.
// It sits with the routing: the delivery reports attempts and knows nothing of selectors.
import type { AttemptLog } from './delivery/delivery';
import { SmtpMuxError } from './errors';
import type { SelectorOutcome } from './selector/types';

export interface Verdict {
  readonly delivered: boolean;
  /** null: accepted, answer 250. */
  readonly error: SmtpMuxError | null;
  readonly downstream?: string;
}

export function judge(delivery: { readonly delivered?: { readonly downstream: string }; readonly attempts: readonly AttemptLog[] }, outcome: SelectorOutcome): Verdict {
  if (delivery.delivered) return { delivered: true, error: null, downstream: delivery.delivered.downstream };
  if (outcome.kind === 'fault' && outcome.fault !== 'threw' && outcome.fault !== 'bad-result') {
    const code = outcome.fault === 'timeout' ? 'SMTPMUX_SELECTOR_TIMEOUT' : outcome.fault === 'memory' ? 'SMTPMUX_SELECTOR_MEMORY' : 'SMTPMUX_SELECTOR_UNAVAILABLE';
    return { delivered: false, error: new SmtpMuxError(code) };
  }
  const attempts = delivery.attempts;
  if (attempts.length === 0) {
    if (outcome.kind === 'fault' && outcome.fault === 'threw') return { delivered: false, error: new SmtpMuxError('SMTPMUX_SELECTOR_FAILED') };
    return { delivered: false, error: new SmtpMuxError('SMTPMUX_SELECTOR_BAD_RESULT') };
  }
  if (attempts.every((a) => a.skipped)) {
    // Nothing was contacted: say why each downstream was left alone, and until when.
    const why = attempts.map((a) => `${a.downstream}: ${a.skipped === 'quota' ? 'out of quota' : a.skipped === 'rate' ? 'at its rate limit' : 'cooling down'} until ${a.until}`);
    return { delivered: false, error: new SmtpMuxError('SMTPMUX_DOWNSTREAMS_LIMITED', [...new Set(why)].join(', ')) };
  }
  const summary = attempts.map((a) => `${a.downstream}: ${a.skipped ? `skipped (${a.skipped})` : (a.responseCode ?? a.code)}`).join(', ');
  const last = attempts[attempts.length - 1];
  if (attempts.every((a) => a.permanent)) {
    // Pass the downstream's own reply through: it says best why the message was refused.
    const reply = last.responseCode ?? 554;
    const enhanced = /^\d{3}[ -](5\.\d{1,3}\.\d{1,3})\b/.exec(last.response ?? '')?.[1] ?? '5.0.0';
    return { delivered: false, error: new SmtpMuxError('SMTPMUX_DOWNSTREAM_REJECTED', summary, { reply, enhanced }) };
  }
  return { delivered: false, error: new SmtpMuxError('SMTPMUX_DOWNSTREAMS_UNAVAILABLE', summary) };
}
