// One message, one way through: selector run → delivery attempts → one verdict → one log line.
import type { Config } from './config/load';
import { Delivery, type DeliveryOptions } from './delivery/delivery';
import type { Envelope } from './delivery/pool';
import type { MessageBody } from './message/body';
import type { Logger } from './observe/logger';
import type { AttemptResult, Metrics } from './observe/metrics';
import type { Runtime, UserRuntime } from './runtime';
import { SelectorState } from './selector/state';
import type { MessageSummary, RunHost, SelectorOutcome } from './selector/types';
import type { SmtpMuxError } from './errors';
import { judge, type Verdict } from './verdict';

export interface Routed {
  /** null: delivered, answer 250. */
  readonly error: SmtpMuxError | null;
  readonly downstream?: string;
}

/**
 * Runs the user's selector over one Delivery, tries the order it returned, and waits for every attempt
 * before judging: the one sequence the proxy and `smtpmux try` share. Never rejects.
 */
export async function decide(
  user: UserRuntime,
  message: MessageSummary,
  delivery: Delivery,
  host: RunHost,
): Promise<{ outcome: SelectorOutcome; verdict: Verdict; selectorSeconds: number }> {
  let outcome: SelectorOutcome;
  let selectorSeconds = 0;
  try {
    const started = performance.now();
    outcome = await user.selector.run(message, await user.views(), host);
    selectorSeconds = (performance.now() - started) / 1000;
    // A run that ended as a fault other than its own throw was cut off: what it queued is not its decision any more.
    if (outcome.kind === 'fault' && (outcome.fault === 'timeout' || outcome.fault === 'memory' || outcome.fault === 'unavailable')) delivery.endScript();
    if (outcome.kind === 'order') await delivery.tryInOrder(outcome.targets);
  } catch (err) {
    // Not expected (run() never rejects); whatever it was, the latch below still decides the reply.
    outcome = { kind: 'fault', fault: 'threw', detail: `internal error: ${(err as Error)?.message ?? err}` };
  } finally {
    // A send() the script did not wait for may still deliver: the answer waits for every attempt.
    await delivery.settled();
  }
  return { outcome, verdict: judge(delivery, outcome), selectorSeconds };
}

/** The metrics' name for how an attempt ended; one the delivery skipped (a cooling downstream, say) says why in `skipped`. */
export function attemptResult(attempt: { readonly ok: boolean; readonly permanent?: boolean; readonly skipped?: string }): AttemptResult {
  if (attempt.skipped) return 'skipped';
  return attempt.ok ? 'ok' : attempt.permanent ? 'permanent' : 'temporary';
}

/** The Delivery settings of one message under this config. */
export function deliveryOptions(config: Config, messageId: string): DeliveryOptions {
  return { messageId, maxSends: config.limits.maxSends, attemptTimeoutMs: config.delivery.attemptTimeoutMs, rateWaitMs: config.delivery.rateWaitMs };
}

export async function routeMessage(
  runtime: Runtime,
  user: UserRuntime,
  message: MessageSummary,
  envelope: Envelope,
  body: MessageBody,
  logger: Logger,
  metrics: Metrics,
): Promise<Routed> {
  const started = Date.now();
  const selector = user.selectorLabel;
  // The message's id and user lead every line about it, as a child logger's bindings would, without
  // building a child logger per message.
  const about = { msgId: message.id, user: user.email };
  const delivery = new Delivery(body, envelope, user.targets, deliveryOptions(runtime.config, message.id));

  const { outcome, verdict, selectorSeconds } = await decide(user, message, delivery, {
    send: (target) => delivery.send(target),
    log: (text) => logger.info({ ...about, selector, scriptLog: true }, text),
    state: new SelectorState(runtime.state, user.email),
  });

  metrics.selectorRun(selectorSeconds);
  // Attempts name configured downstreams only (a name the script made up is refused before an attempt).
  // A downstream skipped (cooling, at its rate, out of quota) was not contacted: result="skipped".
  for (const attempt of delivery.attempts) metrics.attempt(user.email, attempt.downstream, attemptResult(attempt), attempt.ms);

  for (const attempt of delivery.attempts) {
    if (attempt.coolingUntil) logger.warn({ ...about, downstream: attempt.downstream, until: attempt.coolingUntil, code: attempt.code, responseCode: attempt.responseCode }, 'downstream cooling down');
  }
  const line = {
    ...about,
    from: envelope.from,
    rcpts: envelope.to.length,
    size: body.size,
    spilled: body.spilled || undefined,
    selector,
    attempts: delivery.attempts.map(({ response: _response, ...attempt }) => attempt),
    selectorResult: outcome,
    problems: delivery.problems.length > 0 ? delivery.problems : undefined,
    refusedRecipients: delivery.delivered?.rejected.length ? delivery.delivered.rejected : undefined,
    reply: verdict.error ? `${verdict.error.responseCode} ${verdict.error.enhanced}` : '250 2.0.0',
    ms: Date.now() - started,
  };
  if (verdict.delivered) {
    // The script may still have failed after its send() succeeded: 250 stands, the failure is logged.
    const level = outcome.kind === 'fault' || outcome.kind === 'reason' || line.refusedRecipients ? 'warn' : 'info';
    logger[level]({ ...line, outcome: 'delivered', downstream: verdict.downstream }, 'message delivered');
  } else {
    const temporary = (verdict.error?.responseCode ?? 451) < 500;
    logger.warn({ ...line, outcome: temporary ? 'deferred' : 'rejected', code: verdict.error?.code }, temporary ? 'message deferred' : 'message rejected');
  }
  return { error: verdict.error, downstream: verdict.downstream };
}
