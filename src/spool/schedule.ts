// When a queued message is tried next: exponential back-off from first_retry, doubling per failed
// attempt up to max_retry, with ±20% jitter so messages queued together do not retry in lockstep.
import type { QueueConfig } from '../config/load';

export const JITTER = 0.2;

/**
 * The wait after `attempts` failed attempts (the live one included): first_retry after the first,
 * doubling after each further one, never more than max_retry (jitter included). `random` in [0, 1).
 */
export function retryDelay(attempts: number, queue: Pick<QueueConfig, 'firstRetryMs' | 'maxRetryMs'>, random: number = Math.random()): number {
  const exponent = Math.max(0, Math.min(attempts - 1, 40));
  const base = Math.min(queue.maxRetryMs, queue.firstRetryMs * 2 ** exponent);
  const jittered = base * (1 - JITTER + 2 * JITTER * random);
  return Math.max(1, Math.round(Math.min(queue.maxRetryMs, jittered)));
}
