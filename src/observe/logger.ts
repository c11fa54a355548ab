// The logger: pino, JSON lines on stdout. Secrets are kept out structurally (redact), not by care.
import pino, { type Logger } from 'pino';

export type { Logger };

export const REDACT_PATHS = ['pass', 'password', '*.pass', '*.password', 'auth', '*.auth', 'users[*].password', 'users[*].downstreams[*].pass'];

export function createLogger(options: { level?: string; destination?: pino.DestinationStream } = {}): Logger {
  return pino(
    {
      level: options.level ?? process.env.SMTPMUX_LOG_LEVEL ?? 'info',
      base: { name: 'smtpmux' },
      redact: { paths: REDACT_PATHS, censor: '[redacted]' },
      timestamp: pino.stdTimeFunctions.isoTime,
    },
    options.destination ?? pino.destination({ dest: 1, sync: false }),
  );
}
