// Reads a config file into a validated, frozen Config: YAML → ${ENV} substitution → schema → selector paths.
// Every problem is collected and reported as `file:key: what is wrong (line N)`; nothing here throws
// anything but a ConfigError.
import { promises as fs, constants as fsConstants } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { LineCounter, parseDocument, isNode, type Document } from 'yaml';
import { isIP } from 'node:net';
import { createSecureContext } from 'node:tls';
import { classifyPassword, looksLikeBrokenHash } from '../auth/password';
import type { PenaltySettings } from '../auth/penalty';
import { selfSigned } from '../tls/selfsigned';
import { configSchema, type TlsMode } from './schema';

export interface DownstreamConfig {
  readonly name: string;
  readonly addr: string;
  readonly host: string;
  readonly port: number;
  readonly user?: string;
  readonly pass?: string;
  readonly tls: TlsMode;
  readonly verifyTls: boolean;
  readonly tags: readonly string[];
  readonly weight: number;
  /** At most `limit` attempts per `periodMs`, paced smoothly. */
  readonly rate?: Readonly<Period>;
  /** At most `limit` accepted per rolling `periodMs`. */
  readonly quota?: Readonly<Period>;
  /** What rate and quota count. */
  readonly count: 'messages' | 'recipients';
  /** The pause after a back-off signal, doubling up to maxMs; absent: never cools. */
  readonly cooldown?: { readonly baseMs: number; readonly maxMs: number };
  /** The verified address a message sent through this downstream is sent from (From rewrite). */
  readonly from?: string;
  /** Whose health, rate and quota this downstream shares (`account:`); absent: its own, per user. */
  readonly account?: string;
}

export interface Period {
  limit: number;
  periodMs: number;
}

export interface UserConfig {
  readonly email: string;
  readonly password: string;
  /** The selector as the config names it ("round-robin.js"). */
  readonly selectorName: string;
  /** Absolute path of the selector script that name resolved to. */
  readonly selectorPath: string;
  readonly downstreams: readonly DownstreamConfig[];
  /** Store and forward: absent = answer 451 when no downstream accepted (milliseconds). */
  readonly queue?: QueueConfig;
}

export interface QueueConfig {
  readonly maxAgeMs: number;
  readonly firstRetryMs: number;
  readonly maxRetryMs: number;
  /** Send a delivery status notification (RFC 3464) to the envelope sender of a message that dies. */
  readonly bounce: boolean;
}

export interface SpoolConfig {
  /** Absolute: a relative `spool.dir` is resolved against the config file's folder. */
  readonly dir: string;
  readonly maxSize: number;
  readonly pollIntervalMs: number;
  readonly concurrency: number;
}

export interface StateConfig {
  /** Absent: limits and ctx.state live in this process. */
  readonly redis?: string;
  readonly prefix: string;
  readonly timeoutMs: number;
}

export interface Config {
  readonly file: string;
  readonly listen: { readonly host: string; readonly port: number };
  readonly hostname?: string;
  readonly allowInsecureAuth: boolean;
  readonly maxMessageSize: number;
  readonly limits: { readonly selectorTimeoutMs: number; readonly selectorMemoryMb: number; readonly maxSends: number };
  readonly delivery: { readonly connectTimeoutMs: number; readonly socketTimeoutMs: number; readonly attemptTimeoutMs: number; readonly maxConnections: number; readonly rateWaitMs: number };
  readonly state: StateConfig;
  /** Inbound TLS: STARTTLS on the listener, and an implicit-TLS listener when `implicit` is set. */
  readonly tls?: TlsConfig;
  /** true: every peer sends a PROXY header; a list: only these balancer addresses do. */
  readonly proxyProtocol: boolean | readonly string[];
  readonly maxConnections: number;
  readonly maxConnectionsPerAddress: number;
  /** A connection not logged in by then is closed. */
  readonly authTimeoutMs: number;
  readonly maxRecipients: number;
  readonly loginPenalty: PenaltySettings;
  readonly users: readonly UserConfig[];
  /** Users whose password is stored in plaintext (warned about at start-up). */
  readonly plaintextPasswords: readonly string[];
  /** The admin HTTP listener; null when `http: false`. */
  readonly http: HttpConfig | null;
  /** The durable spool; absent unless the config has a `spool` section or a user has `queue`. */
  readonly spool?: SpoolConfig;
  /** Notes worth a log line (a legacy key mapped onto its replacement, ...). */
  readonly warnings: readonly string[];
}

export interface TlsConfig {
  /** Undefined with `selfsigned: true`: the pair is made in memory at start-up and kept until exit. */
  readonly certFile?: string;
  readonly keyFile?: string;
  readonly implicit?: { readonly host: string; readonly port: number };
  /** The PEM text as read when the config was loaded: a reload reads it again. */
  readonly material: { readonly cert: string; readonly key: string };
}

/** TLS 1.2 and newer only, on every inbound listener. */
export const INBOUND_TLS_MIN_VERSION = 'TLSv1.2';

/** The start-up warning for users whose password is stored in plaintext; undefined when there are none. */
export function plaintextPasswordWarning(config: Config): string | undefined {
  if (config.plaintextPasswords.length === 0) return undefined;
  return `plaintext password for ${config.plaintextPasswords.join(', ')}: store an argon2id hash instead (smtpmux hash-password) or a bcrypt one (htpasswd -nbB)`;
}

/** Where a listener accepts plaintext logins from more than this machine without TLS: worth an error at every start and reload. */
export function insecureListenerWarning(config: Config): string | undefined {
  if (!config.allowInsecureAuth || config.tls) return undefined;
  const host = config.listen.host;
  const loopback = host === 'localhost' || host === '::1' || (isIP(host) === 4 && host.startsWith('127.'));
  if (loopback) return undefined;
  return `INSECURE: listening on ${host}:${config.listen.port} with allow_insecure_auth and no tls: passwords cross the network in the clear. Configure tls (smtpmux tls selfsigned DIR for a test setup) or listen on 127.0.0.1 only`;
}

export interface HttpConfig {
  readonly host: string;
  readonly port: number;
  /** Bearer token for everything but /livez and /readyz; undefined: no token. */
  readonly token?: string;
}

export class ConfigError extends Error {
  constructor(
    readonly file: string,
    readonly problems: readonly string[],
  ) {
    super(`${file}: invalid config\n${problems.map((p) => `  ${p}`).join('\n')}`);
    this.name = 'ConfigError';
  }
}

/** Where the bundled selector library lives (selectors/ at the package root). */
export const BUNDLED_SELECTORS = path.resolve(__dirname, '..', '..', 'selectors');

export type Env = Readonly<Record<string, string | undefined>>;

type PathKey = string | number;

function formatKey(keys: readonly PathKey[]): string {
  return keys.reduce<string>((out, key) => (typeof key === 'number' ? `${out}[${key}]` : out ? `${out}.${key}` : key), '') || '(top level)';
}

/** A value that came from the environment: error messages name the variable, never the value. */
interface FromEnv {
  readonly keys: readonly PathKey[];
  readonly name: string;
  readonly value: string;
}

/** Replaces ${VAR} and ${VAR:-default} in every string value; $${ stays a literal ${. */
function substituteEnv(value: unknown, env: Env, keys: PathKey[], problems: string[], file: string, lineOf: (k: PathKey[]) => string, fromEnv: FromEnv[]): unknown {
  if (typeof value === 'string') {
    return value.replace(/\$(\$)?\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}/g, (whole, escaped, name: string, fallback?: string) => {
      if (escaped) return whole.slice(1);
      const found = env[name];
      if (found !== undefined && found !== '') {
        fromEnv.push({ keys, name, value: found });
        return found;
      }
      if (fallback !== undefined) return fallback;
      problems.push(`${file}:${formatKey(keys)}: environment variable ${name} is not set${lineOf(keys)}`);
      return '';
    });
  }
  if (Array.isArray(value)) return value.map((item, i) => substituteEnv(item, env, [...keys, i], problems, file, lineOf, fromEnv));
  if (value && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, substituteEnv(v, env, [...keys, k], problems, file, lineOf, fromEnv)]));
  }
  return value;
}

/** The message with every value that came from the environment under `keys` replaced by its ${NAME}. */
function withoutEnvValues(message: string, keys: readonly PathKey[], fromEnv: readonly FromEnv[]): string {
  let out = message;
  for (const entry of fromEnv) {
    if (!keys.every((k, i) => entry.keys[i] === k)) continue;
    for (const form of new Set([JSON.stringify(entry.value).slice(1, -1), entry.value])) {
      if (form) out = out.split(form).join(`\${${entry.name}}`);
    }
  }
  return out;
}

function lineFinder(doc: Document, lines: LineCounter): (keys: PathKey[]) => string {
  return (keys) => {
    for (let depth = keys.length; depth > 0; depth--) {
      const node = doc.getIn(keys.slice(0, depth), true);
      if (isNode(node) && node.range) return ` (line ${lines.linePos(node.range[0]).line})`;
    }
    return '';
  };
}

async function isReadableFile(file: string): Promise<boolean> {
  try {
    await fs.access(file, fsConstants.R_OK);
    return (await fs.stat(file)).isFile();
  } catch {
    return false;
  }
}

const JS_FILE = /\.(m?js|cjs)$/i;

/**
 * Finds a selector by the name the config gives: relative to the config's folder, then in selectors/ beside
 * it, then in the bundled library; ".js" may be left off. The original's Go plugins and Starlark scripts
 * (./plugins/round_robin/round-robin-plugin, round_robin.star) map onto the bundled selector of the same
 * strategy, whether or not the old file is still there; any other file that is not JavaScript is refused.
 */
export async function resolveSelector(given: string, configDir: string): Promise<{ file?: string; legacy?: boolean; notJs?: string }> {
  const names = JS_FILE.test(given) ? [given] : [`${given}.js`, given];
  const dirs = [configDir, path.join(configDir, 'selectors'), BUNDLED_SELECTORS];
  let notJs: string | undefined;
  for (const dir of dirs) {
    for (const name of names) {
      const candidate = path.resolve(dir, name);
      if (path.isAbsolute(name) && dir !== configDir) continue;
      if (!(await isReadableFile(candidate))) continue;
      if (JS_FILE.test(candidate)) return { file: candidate };
      notJs ??= candidate;
    }
  }
  const strategy = /round[-_]?robin/i.test(given) ? 'round-robin.js' : /waterfall|failover/i.test(given) ? 'waterfall.js' : undefined;
  if (strategy && !JS_FILE.test(given)) return { file: path.join(BUNDLED_SELECTORS, strategy), legacy: true };
  return notJs ? { notJs } : {};
}

function splitAddr(addr: string): { host: string; port: number } {
  const at = addr.lastIndexOf(':');
  return { host: addr.slice(0, at).replace(/^\[|\]$/g, ''), port: Number(addr.slice(at + 1)) };
}

/** Parses and validates config text; `file` is used for messages and to resolve selector paths. */
export async function parseConfig(text: string, file: string, env: Env = process.env): Promise<Config> {
  const absFile = path.resolve(file);
  const shown = path.relative(process.cwd(), absFile) || absFile;
  const lines = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lines, prettyErrors: true, uniqueKeys: true });
  if (doc.errors.length > 0) {
    throw new ConfigError(shown, doc.errors.map((e) => `${shown}:${e.linePos?.[0].line ?? '?'}:${e.linePos?.[0].col ?? '?'}: YAML: ${e.message.split('\n')[0]}`));
  }
  const lineOf = lineFinder(doc, lines);
  const problems: string[] = [];
  const fromEnv: FromEnv[] = [];
  const raw = substituteEnv(doc.toJS() ?? {}, env, [], problems, shown, lineOf, fromEnv) as Record<string, unknown>;

  // Environment overrides users know from the original and from container platforms.
  if (env.SMTPMUX_PORT) raw.listen = { ...(raw.listen as object), port: env.SMTPMUX_PORT };
  if (env.SMTPMUX_HOST) raw.listen = { ...(raw.listen as object), host: env.SMTPMUX_HOST };
  if (env.USE_INSECURE_AUTH === 'true') raw.allow_insecure_auth = true;
  // The admin listener's overrides apply to a mapping or an absent key, never over `http: false`.
  const httpEnv = { port: env.SMTPMUX_HTTP_PORT, host: env.SMTPMUX_HTTP_HOST, token: env.SMTPMUX_HTTP_TOKEN };
  if (raw.http === undefined || raw.http === null || (typeof raw.http === 'object' && !Array.isArray(raw.http))) {
    const http = { ...((raw.http as object | null) ?? {}) } as Record<string, unknown>;
    for (const [key, value] of Object.entries(httpEnv)) if (value) http[key] = value;
    if (Object.values(httpEnv).some(Boolean)) raw.http = http;
  }

  const parsed = configSchema.safeParse(raw);
  if (!parsed.success) {
    for (const issue of parsed.error.issues) {
      const keys = issue.path.filter((k): k is PathKey => typeof k !== 'symbol');
      problems.push(`${shown}:${formatKey(keys)}: ${withoutEnvValues(issue.message, keys, fromEnv)}${lineOf(keys)}`);
    }
  }
  // Selector files are looked up even when the schema found problems, so one run lists them all.
  const configDir = path.dirname(absFile);
  const selectors: { file: string; legacy?: boolean; given: string; key: string }[] = [];
  for (const [i, entry] of (Array.isArray(raw.users) ? (raw.users as unknown[]) : []).entries()) {
    const user = (entry && typeof entry === 'object' ? entry : {}) as Record<string, unknown>;
    const key = user.selector ? 'selector' : 'selector_algo_path';
    const given = user[key];
    if (typeof given !== 'string' || given === '') continue; // the schema reports it
    const found = await resolveSelector(given, configDir);
    if (found.file) selectors[i] = { file: found.file, legacy: found.legacy, given, key };
    else if (found.notJs) problems.push(`${shown}:users[${i}].${key}: ${found.notJs} is not a JavaScript file; selectors are .js files (see the bundled selectors/)${lineOf(['users', i, key])}`);
    else problems.push(`${shown}:users[${i}].${key}: selector "${withoutEnvValues(given, ['users', i, key], fromEnv)}" not found (looked beside the config, in selectors/ and in the bundled library)${lineOf(['users', i, key])}`);
  }
  const tls = parsed.success && parsed.data.tls ? await readTls(parsed.data.tls, parsed.data.hostname, configDir, shown, lineOf, problems) : undefined;
  if (parsed.success) {
    parsed.data.users.forEach((user, i) => {
      if (looksLikeBrokenHash(user.password)) {
        problems.push(`${shown}:users[${i}].password: looks like a password hash but is not a valid argon2id or bcrypt one (truncated, or quoting lost a "$"?); it would be taken as a plaintext password${lineOf(['users', i, 'password'])}`);
      }
    });
  }
  if (!parsed.success || problems.length > 0) throw new ConfigError(shown, problems);

  const data = parsed.data;
  const warnings: string[] = [];
  const plaintextPasswords = data.users.filter((u) => classifyPassword(u.password).scheme === 'plain').map((u) => u.email);
  const users: UserConfig[] = [];
  for (const [i, user] of data.users.entries()) {
    const found = selectors[i];
    const { given, key } = found;
    if (found.legacy) warnings.push(`users[${i}].${key}: "${given}" is a Go plugin or Starlark script of the original; using the bundled ${path.basename(found.file)}`);
    users.push(
      Object.freeze({
        email: user.email,
        password: user.password,
        selectorName: given,
        selectorPath: found.file,
        downstreams: Object.freeze(
          user.downstreams.map((ds) =>
            Object.freeze({
              name: ds.name ?? ds.addr,
              addr: ds.addr,
              ...splitAddr(ds.addr),
              user: ds.user,
              pass: ds.pass,
              tls: ds.tls,
              verifyTls: ds.verify_tls,
              tags: Object.freeze([...ds.tags]),
              weight: ds.weight,
              rate: ds.rate && Object.freeze(ds.rate),
              quota: ds.quota && Object.freeze(ds.quota),
              count: ds.count,
              cooldown: ds.cooldown ? Object.freeze({ baseMs: ds.cooldown, maxMs: Math.max(ds.cooldown, ds.cooldown_max) }) : undefined,
              from: ds.from,
              account: ds.account,
            }),
          ),
        ),
        queue:
          user.queue &&
          Object.freeze({ maxAgeMs: user.queue.max_age, firstRetryMs: user.queue.first_retry, maxRetryMs: user.queue.max_retry, bounce: user.queue.bounce }),
      }),
    );
  }

  return Object.freeze({
    file: absFile,
    listen: Object.freeze({ ...data.listen }),
    hostname: data.hostname,
    allowInsecureAuth: data.allow_insecure_auth,
    maxMessageSize: data.max_message_size,
    limits: Object.freeze({
      selectorTimeoutMs: data.limits.selector_timeout_ms,
      selectorMemoryMb: data.limits.selector_memory_mb,
      maxSends: data.limits.max_sends,
    }),
    delivery: Object.freeze({
      connectTimeoutMs: data.delivery.connect_timeout_ms,
      socketTimeoutMs: data.delivery.socket_timeout_ms,
      attemptTimeoutMs: data.delivery.attempt_timeout_ms,
      maxConnections: data.delivery.max_connections,
      rateWaitMs: data.delivery.rate_wait_ms,
    }),
    state: Object.freeze({ redis: data.state.redis, prefix: data.state.prefix, timeoutMs: data.state.timeout_ms }),
    tls,
    proxyProtocol: data.proxy_protocol,
    maxConnections: data.max_connections,
    maxConnectionsPerAddress: data.max_connections_per_address,
    authTimeoutMs: data.auth_timeout_ms,
    maxRecipients: data.max_recipients,
    loginPenalty: Object.freeze({
      failureDelayMs: data.login_penalty.failure_delay_ms,
      freeFailures: data.login_penalty.free_failures,
      maxDelayMs: data.login_penalty.max_delay_ms,
      lockoutFailures: data.login_penalty.lockout_failures,
      windowMs: data.login_penalty.window_ms,
    }),
    users: Object.freeze(users),
    plaintextPasswords: Object.freeze(plaintextPasswords),
    http: data.http === false ? null : Object.freeze({ host: data.http.host, port: data.http.port, token: data.http.token }),
    spool:
      data.spool || users.some((u) => u.queue)
        ? Object.freeze({
            dir: path.resolve(configDir, data.spool?.dir ?? './spool'),
            maxSize: data.spool?.max_size ?? 2 * 1024 ** 3,
            pollIntervalMs: data.spool?.poll_interval ?? 1000,
            concurrency: data.spool?.concurrency ?? 4,
          })
        : undefined,
    warnings: Object.freeze(warnings),
  });
}

/** The pair `selfsigned: true` serves: made once per process, so a reload keeps the same certificate. */
let generated: { cert: string; key: string } | undefined;

/** Reads the certificate and key named by `tls:` and checks that they make a usable pair. */
async function readTls(
  given: { cert?: string; key?: string; selfsigned: boolean; implicit?: { host: string; port: number } },
  hostname: string | undefined,
  configDir: string,
  shown: string,
  lineOf: (k: PathKey[]) => string,
  problems: string[],
): Promise<TlsConfig | undefined> {
  const implicit = given.implicit ? Object.freeze({ ...given.implicit }) : undefined;
  if (given.selfsigned || !given.cert || !given.key) {
    generated ??= selfSigned([...new Set([hostname ?? os.hostname(), 'localhost', '127.0.0.1', '::1'])], 3650);
    const tls = { implicit } as TlsConfig;
    Object.defineProperty(tls, 'material', { value: Object.freeze({ cert: generated.cert, key: generated.key }), enumerable: false });
    return Object.freeze(tls);
  }
  const certFile = path.resolve(configDir, given.cert);
  const keyFile = path.resolve(configDir, given.key);
  const read = async (file: string, key: 'cert' | 'key'): Promise<string | undefined> => {
    try {
      return await fs.readFile(file, 'utf8');
    } catch (err) {
      problems.push(`${shown}:tls.${key}: cannot read ${file} (${(err as NodeJS.ErrnoException).code ?? String(err)})${lineOf(['tls', key])}`);
      return undefined;
    }
  };
  const [cert, key] = await Promise.all([read(certFile, 'cert'), read(keyFile, 'key')]);
  if (cert === undefined || key === undefined) return undefined;
  try {
    createSecureContext({ cert, key, minVersion: INBOUND_TLS_MIN_VERSION });
  } catch (err) {
    // OpenSSL's reason ("key values mismatch", "no start line"), never the file's content.
    const reason = String((err as Error).message ?? err).split('\n')[0];
    problems.push(`${shown}:tls: ${certFile} and ${keyFile} are not a usable certificate and key (${reason})${lineOf(['tls'])}`);
    return undefined;
  }
  const tls = { certFile, keyFile, implicit } as TlsConfig;
  // Not enumerable: a config printed or serialised by mistake does not carry the private key along.
  Object.defineProperty(tls, 'material', { value: Object.freeze({ cert, key }), enumerable: false });
  return Object.freeze(tls);
}

export async function loadConfig(file: string, env: Env = process.env): Promise<Config> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    throw new ConfigError(file, [`${file}: cannot read the config file (${(err as NodeJS.ErrnoException).code ?? String(err)})`]);
  }
  return parseConfig(text, file, env);
}
