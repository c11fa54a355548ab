// The logger: pino, JSON lines on stdout. Secrets are kept out structurally (redact), not by care.
import pino, { type Logger } from 'pino';

export type { Logger };

export const REDACT_PATHS = ['pass', 'password', '*.pass', '*.password', 'auth', '*.auth', 'users[*].password', 'users[*].downstreams[*].pass'];

/**
 * Lines go to stdout in batches: a write once LOG_BATCH_BYTES have gathered, else every LOG_FLUSH_MS, and
 * whatever is left when the process exits (pino flushes an async destination on exit). A write per line
 * cost a thread-pool round trip per message, about a tenth of the CPU of relaying a small one.
 */
export const LOG_BATCH_BYTES = 8192;
export const LOG_FLUSH_MS = 100;

export function createLogger(options: { level?: string; destination?: pino.DestinationStream } = {}): Logger {
  return pino(
    {
      level: options.level ?? process.env.SMTPMUX_LOG_LEVEL ?? 'info',
      base: { name: 'smtpmux' },
      redact: { paths: REDACT_PATHS, censor: '[redacted]' },
      timestamp: pino.stdTimeFunctions.isoTime,
    },
    options.destination ?? pino.destination({ dest: 1, sync: false, minLength: LOG_BATCH_BYTES, periodicFlush: LOG_FLUSH_MS }),
  );
}
