// The config file's schema: one zod schema that is both the validation and the TypeScript type.
// Keys of the Go original (selector_algo_path, addr, user, pass) are accepted as they were.
import { isIP } from 'node:net';
import { z } from 'zod';

const SIZE_UNITS: Record<string, number> = { '': 1, b: 1, k: 1024, kb: 1024, m: 1024 ** 2, mb: 1024 ** 2, g: 1024 ** 3, gb: 1024 ** 3 };

const SIZE_HINT = 'use a whole number of bytes or a number with KB, MB or GB, e.g. 25MB';

/** "25MB", "512 kb", 1048576 → bytes. One transform, not a union of two, so the message says what is wrong. */
const byteSize = z.union([z.number(), z.string()], { error: `must be a size (${SIZE_HINT})` }).transform((value, ctx) => {
  const match = typeof value === 'string' ? /^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$/i.exec(value) : undefined;
  const unit = match ? SIZE_UNITS[match[2].toLowerCase()] : undefined;
  const bytes = typeof value === 'number' ? value : match && unit !== undefined ? Math.floor(Number(match[1]) * unit) : NaN;
  if (!Number.isSafeInteger(bytes) || bytes <= 0) {
    ctx.addIssue({ code: 'custom', message: `${JSON.stringify(value)} is not a size (${SIZE_HINT})` });
    return z.NEVER;
  }
  return bytes;
});

/** The admin HTTP listener's port unless the config or SMTPMUX_HTTP_PORT says otherwise. */
export const DEFAULT_HTTP_PORT = 9587;
const DURATION_UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
const DURATION_HINT = 'use a number with ms, s, m, h or d, e.g. 60s, 30m, 24h';

function parseDuration(text: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$/i.exec(text);
  return match ? Math.round(Number(match[1]) * DURATION_UNITS[match[2].toLowerCase()]) : NaN;
}

/** "60s", "30m", "200ms" → milliseconds (a bare number is milliseconds). */
const duration = z.union([z.number(), z.string()], { error: `must be a duration (${DURATION_HINT})` }).transform((value, ctx) => {
  const ms = typeof value === 'number' ? value : parseDuration(value);
  if (!Number.isSafeInteger(ms) || ms < 0) {
    ctx.addIssue({ code: 'custom', message: `${JSON.stringify(value)} is not a duration (${DURATION_HINT})` });
    return z.NEVER;
  }
  return ms;
});

const positiveDuration = duration.refine((ms) => ms > 0, { message: 'must be longer than 0' });

/** A user's store-and-forward settings: present = keep a message that no downstream took for now. */
export const queueSchema = z
  .object({
    max_age: positiveDuration.default(3 * 86_400_000),
    first_retry: positiveDuration.default(30_000),
    max_retry: positiveDuration.default(3_600_000),
    bounce: z.boolean().default(false),
  })
  .strict()
  .refine((q) => q.first_retry <= q.max_retry, { message: 'first_retry must not be longer than max_retry', path: ['first_retry'] });

/**
 * "14/s", "100/m", "200/24h", "100/d" → { limit, periodMs }: `limit` per period, where the period is a
 * unit (s, m, h, d) or a duration (24h, 10m). `units` are the ones allowed without a number.
 */
function perPeriod(what: string, example: string) {
  const hint = `write ${what} as N/<period>, e.g. ${example}`;
  return z.string({ error: hint }).transform((value, ctx) => {
    const match = /^\s*(\d+)\s*\/\s*(\d+(?:\.\d+)?)?\s*(ms|s|m|h|d)\s*$/i.exec(value);
    const limit = match ? Number(match[1]) : NaN;
    const periodMs = match ? Math.round(Number(match[2] ?? 1) * DURATION_UNITS[match[3].toLowerCase()]) : NaN;
    if (!Number.isSafeInteger(limit) || limit < 1 || !Number.isSafeInteger(periodMs) || periodMs < 1) {
      ctx.addIssue({ code: 'custom', message: `${JSON.stringify(value)}: ${hint}` });
      return z.NEVER;
    }
    return { limit, periodMs };
  });
}

// 0 lets the OS pick a free port (tests do).
const port = z.coerce.number().int().min(0).max(65535);

const hostPort = z.string().regex(/^(\[[0-9a-fA-F:.]+\]|[^\s:\[\]]+):\d{1,5}$/, 'must be host:port, e.g. "smtp.example.com:587"');

export const LOGIN_PENALTY_DEFAULTS = { failure_delay_ms: 1000, free_failures: 3, max_delay_ms: 30_000, lockout_failures: 10, window_ms: 900_000 };

export const TLS_MODES = ['auto', 'none', 'starttls', 'tls'] as const;

export const downstreamSchema = z
  .object({
    name: z.string().min(1).regex(/^\S+$/, 'must not contain spaces').optional(),
    addr: hostPort,
    user: z.string().optional(),
    pass: z.string().optional(),
    tls: z.enum(TLS_MODES).default('auto'),
    verify_tls: z.boolean().default(true),
    tags: z.array(z.string()).default([]),
    weight: z.number().nonnegative().default(1),
    rate: perPeriod('a rate', '14/s, 100/m or 1000/h').optional(),
    quota: perPeriod('a quota', '200/24h or 100/d').optional(),
    count: z.enum(['messages', 'recipients']).default('messages'),
    cooldown: duration.optional(),
    cooldown_max: duration.default(30 * 60_000),
    from: z.string().regex(/^[^\s<>@]+@[^\s<>@]+$/, 'must be a plain address, e.g. noreply@verified.example').optional(),
    account: z.string().min(1).regex(/^\S+$/, 'must not contain spaces').optional(),
  })
  .strict()
  .refine((ds) => (ds.user === undefined) === (ds.pass === undefined), {
    message: 'user and pass go together: give both or neither',
    path: ['pass'],
  });

export const userSchema = z
  .object({
    email: z.string().min(1, 'must not be empty'),
    password: z.string().min(1, 'must not be empty'),
    selector: z.string().min(1).optional(),
    selector_algo_path: z.string().min(1).optional(),
    downstreams: z.array(downstreamSchema).min(1, 'list at least one downstream'),
    queue: queueSchema.optional(),
  })
  .strict()
  .superRefine((user, ctx) => {
    if (!user.selector && !user.selector_algo_path) {
      ctx.addIssue({ code: 'custom', message: 'name a selector script (selector: round-robin.js)', path: ['selector'] });
    }
    const seen = new Set<string>();
    user.downstreams.forEach((ds, i) => {
      const name = ds.name ?? ds.addr;
      if (seen.has(name)) {
        ctx.addIssue({ code: 'custom', message: `downstream name "${name}" is used twice; give each a distinct name`, path: ['downstreams', i, 'name'] });
      }
      seen.add(name);
    });
  });

export const configSchema = z
  .object({
    listen: z
      .object({ host: z.string().min(1).default('127.0.0.1'), port: port.default(2525) })
      .strict()
      .default({ host: '127.0.0.1', port: 2525 }),
    hostname: z.string().min(1).optional(),
    allow_insecure_auth: z.boolean().default(false),
    max_message_size: byteSize.default(25 * 1024 * 1024),
    limits: z
      .object({
        selector_timeout_ms: z.number().int().min(10).max(600_000).default(30_000),
        selector_memory_mb: z.number().int().min(8).max(4096).default(64),
        max_sends: z.number().int().min(1).max(100).default(5),
      })
      .strict()
      .default({ selector_timeout_ms: 30_000, selector_memory_mb: 64, max_sends: 5 }),
    delivery: z
      .object({
        connect_timeout_ms: z.number().int().min(100).default(10_000),
        socket_timeout_ms: z.number().int().min(100).default(60_000),
        attempt_timeout_ms: z.number().int().min(100).max(3_600_000).default(120_000),
        max_connections: z.number().int().min(1).max(100).default(5),
        rate_wait_ms: z.number().int().min(0).max(60_000).default(1000),
      })
      .strict()
      .default({ connect_timeout_ms: 10_000, socket_timeout_ms: 60_000, attempt_timeout_ms: 120_000, max_connections: 5, rate_wait_ms: 1000 }),
    state: z
      .object({
        redis: z
          .string()
          .regex(/^rediss?:\/\/\S+$/, 'must be a redis:// or rediss:// URL, e.g. "redis://127.0.0.1:6379/0"')
          .optional(),
        prefix: z.string().max(100).default('smtpmux:'),
        timeout_ms: z.number().int().min(10).max(60_000).default(500),
      })
      .strict()
      .default({ prefix: 'smtpmux:', timeout_ms: 500 }),
    tls: z
      .object({
        cert: z.string().min(1, 'name the certificate file (PEM, full chain)').optional(),
        key: z.string().min(1, 'name the private key file (PEM)').optional(),
        selfsigned: z.boolean().default(false),
        implicit: z.object({ host: z.string().min(1).default('0.0.0.0'), port: port.default(465) }).strict().optional(),
      })
      .strict()
      .superRefine((tls, ctx) => {
        if (tls.selfsigned && (tls.cert || tls.key)) ctx.addIssue({ code: 'custom', message: 'give cert and key, or selfsigned: true, not both' });
        else if (!tls.selfsigned && !(tls.cert && tls.key)) {
          ctx.addIssue({ code: 'custom', message: 'give cert and key (PEM files), or selfsigned: true for a test setup', path: [tls.cert ? 'key' : 'cert'] });
        }
      })
      .optional(),
    // true: a PROXY header from every peer; a list: only from these balancer addresses (others speak SMTP directly).
    proxy_protocol: z
      .union([z.boolean(), z.array(z.string().refine((a) => isIP(a) !== 0, 'must be an IP address (a load balancer that sends PROXY headers)')).min(1)])
      .default(false),
    max_connections: z.number().int().min(1).max(100_000).default(200),
    max_connections_per_address: z.number().int().min(1).max(100_000).default(20),
    auth_timeout_ms: z.number().int().min(100).max(3_600_000).default(30_000),
    max_recipients: z.number().int().min(1).max(100_000).default(100),
    login_penalty: z
      .object({
        failure_delay_ms: z.number().int().min(0).max(60_000).default(LOGIN_PENALTY_DEFAULTS.failure_delay_ms),
        free_failures: z.number().int().min(0).max(1000).default(LOGIN_PENALTY_DEFAULTS.free_failures),
        max_delay_ms: z.number().int().min(0).max(600_000).default(LOGIN_PENALTY_DEFAULTS.max_delay_ms),
        lockout_failures: z.number().int().min(1).max(100_000).default(LOGIN_PENALTY_DEFAULTS.lockout_failures),
        window_ms: z.number().int().min(100).max(86_400_000).default(LOGIN_PENALTY_DEFAULTS.window_ms),
      })
      .strict()
      .default(LOGIN_PENALTY_DEFAULTS),
    // The admin HTTP listener (metrics, health, status page); false turns it off.
    http: z
      .union([
        z.literal(false),
        z
          .object({
            host: z.string().min(1).default('127.0.0.1'),
            port: port.default(DEFAULT_HTTP_PORT),
            token: z.string().min(1, 'must not be empty (leave the key out for no token)').optional(),
          })
          .strict(),
      ], { error: 'must be false or a mapping with host, port and token' })
      .default({ host: '127.0.0.1', port: DEFAULT_HTTP_PORT }),
    spool: z
      .object({
        dir: z.string().min(1).default('./spool'),
        max_size: byteSize.default(2 * 1024 ** 3),
        poll_interval: positiveDuration.default(1000),
        concurrency: z.number().int().min(1).max(100).default(4),
      })
      .strict()
      .optional(),
    users: z.array(userSchema).min(1, 'list at least one user'),
  })
  .strict()
  .superRefine((config, ctx) => {
    const seen = new Set<string>();
    config.users.forEach((user, i) => {
      const login = user.email.toLowerCase();
      if (seen.has(login)) ctx.addIssue({ code: 'custom', message: `user "${user.email}" is listed twice`, path: ['users', i, 'email'] });
      seen.add(login);
    });
  });

export type TlsMode = (typeof TLS_MODES)[number];
