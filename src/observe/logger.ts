// The logger: pino, JSON lines on stdout. Secrets are kept out structurally, not by care: a value under
// a key named pass, password or auth is replaced by "[redacted]" wherever it sits in a logged object or
// a child logger's bindings.
import pino, { type Logger } from 'pino';

export type { Logger };

/** Keys whose values never reach a log line, at any depth (to MAX_DEPTH) of what is logged. */
export const SECRET_KEYS: ReadonlySet<string> = new Set(['pass', 'password', 'auth']);
export const CENSOR = '[redacted]';
/** Deeper than this nothing is looked at (pino's own serializer stops cycles; this bounds the walk). */
const MAX_DEPTH = 10;

/**
 * Lines go to stdout in batches: a write once LOG_BATCH_BYTES have gathered, else every LOG_FLUSH_MS, and
 * whatever is left when the process exits (pino flushes an async destination on exit). A write per line
 * cost a thread-pool round trip per message, 5-8 % of the CPU of relaying a small one.
 */
export const LOG_BATCH_BYTES = 8192;
export const LOG_FLUSH_MS = 100;

/**
 * `value` with every secret key's value replaced by CENSOR, at any depth; `value` itself, not a copy,
 * when it holds none (every line but a mistaken one). Only the objects on the way to a secret are
 * copied (with their prototype and every own property), so what the caller logged is never changed.
 * This walk replaced pino's `redact` with wildcard paths (`*.pass`), which cloned every logged object
 * and cost about as much as the rest of pino per line, and reached one level down only.
 */
export function redactSecrets<T>(value: T, depth = 0): T {
  if (value === null || typeof value !== 'object' || depth > MAX_DEPTH || ArrayBuffer.isView(value)) return value;
  if (Array.isArray(value)) {
    let copy: unknown[] | undefined;
    for (let i = 0; i < value.length; i++) {
      const item: unknown = value[i];
      const clean = redactSecrets(item, depth + 1);
      if (clean !== item) (copy ??= value.slice())[i] = clean;
    }
    return (copy ?? value) as T;
  }
  let copy: object | undefined;
  for (const key of Object.keys(value)) {
    const item: unknown = (value as Record<string, unknown>)[key];
    const clean = SECRET_KEYS.has(key) ? (item === undefined ? item : CENSOR) : redactSecrets(item, depth + 1);
    if (clean === item) continue;
    copy ??= Object.create(Object.getPrototypeOf(value), Object.getOwnPropertyDescriptors(value)) as object;
    Object.defineProperty(copy, key, { value: clean, enumerable: true, writable: true, configurable: true });
  }
  return (copy ?? value) as T;
}

export function createLogger(options: { level?: string; destination?: pino.DestinationStream } = {}): Logger {
  const logger = pino(
    {
      level: options.level ?? process.env.SMTPMUX_LOG_LEVEL ?? 'info',
      base: { name: 'smtpmux' },
      formatters: { log: (object) => redactSecrets(object) },
      timestamp: pino.stdTimeFunctions.isoTime,
    },
    options.destination ?? pino.destination({ dest: 1, sync: false, minLength: LOG_BATCH_BYTES, periodicFlush: LOG_FLUSH_MS }),
  );
  // pino passes a child's bindings through no formatter: give them the same walk. Set on this logger
  // (children inherit it from their parent object), not on pino's prototype.
  const child = logger.child;
  logger.child = function (this: Logger, bindings, childOptions) {
    return child.call(this, redactSecrets(bindings), childOptions);
  } as typeof logger.child;
  return logger;
}
