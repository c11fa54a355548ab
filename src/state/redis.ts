// The StateStore on Redis (or Valkey), for several instances sharing one set of limits. Every operation
// is one Lua script or one atomic command, timed by Redis's own clock (TIME) so instances with skewed
// clocks still agree, and every call carries our own deadline: node-redis's per-command timeout does
// not fire for a command already written to a server that stopped answering (checked here with SIGSTOP).
import { createHash } from 'node:crypto';
import { createClient } from 'redis';
import { StateFullError, StateTypeError, type HealthSnapshot, type LastError, type QuotaGrant, type QuotaSnapshot, type RateGrant, type StateScope, type StateStatus, type StateStore } from './store';

export interface RedisStateOptions {
  /** redis://[[user][:password]@]host[:port][/db] (rediss:// for TLS). */
  readonly url: string;
  /** Put before every key, so several deployments can share one server. */
  readonly prefix: string;
  /** The longest any one call may take before it counts as failed. */
  readonly timeoutMs: number;
}

/** Redis did not answer in time, is unreachable, or answered with an error that is not ours. */
export class StateUnavailableError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'StateUnavailableError';
  }
}

// Shared by the scripts: Redis's clock in whole milliseconds, and dropping the quota entries that left
// the window (a sorted set of id → time, a hash of id → amount and a running total).
const NOW = `local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
`;
const PRUNE = `local function prune(cutoff)
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff)
  if #expired == 0 then return end
  local gone = 0
  for _, id in ipairs(expired) do
    gone = gone + tonumber(redis.call('HGET', KEYS[2], id) or '0')
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
  redis.call('DECRBY', KEYS[3], gone)
end
local function oldest(window)
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) + window end
  return -1
end
`;

// A scope (ctx.state's keys of one user) is a sorted set of member → expiry (ms, +inf for none), KEYS[2],
// with ARGV[3] = maxKeys and ARGV[4] = the member; admit() lets a new key in if the scope has room.
const ADMIT = `local function admit(ttl)
  if #KEYS < 2 then return true end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  redis.call('ZREM', KEYS[2], ARGV[4])
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return false end
  if ttl ~= '' then redis.call('ZADD', KEYS[2], now + tonumber(ttl), ARGV[4]) else redis.call('ZADD', KEYS[2], '+inf', ARGV[4]) end
  return true
end
`;

const SCRIPTS = {
  /** SET in a scope. ARGV: json, ttl ('' = none), maxKeys, member. */
  scopedSet: `${NOW}${ADMIT}
if redis.call('EXISTS', KEYS[1]) == 0 then
  if not admit(ARGV[2]) then return redis.error_reply('SMTPMUX_STATE_FULL') end
elseif ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[4])
else
  redis.call('ZADD', KEYS[2], '+inf', ARGV[4])
end
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) else redis.call('SET', KEYS[1], ARGV[1]) end
return 1`,

  /** GCRA: the key holds the theoretical arrival time of the next slot. ARGV: interval, maxWait, cost (slots taken). */
  acquireRate: `${NOW}
local interval, maxWait, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), math.max(1, tonumber(ARGV[3]))
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - now
if wait > maxWait then return {0, math.ceil(wait)} end
local nextTat = tat + interval * cost
redis.call('SET', KEYS[1], string.format('%.3f', nextTat), 'PX', math.max(1, math.ceil(nextTat - now)))
if wait < 1 then return {1, 0} end
return {1, math.ceil(wait)}`,

  /** ARGV: limit, period. */
  rateAvailable: `${NOW}
local limit, period = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local n = math.floor((now + period - tat) / (period / limit))
return math.max(0, math.min(limit, n))`,

  /** KEYS: times, amounts, total. ARGV: id, amount, limit, window. Returns {ok, used, resetsAt or -1}. */
  reserveQuota: `${NOW}${PRUNE}
local id, amount, limit, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
prune(now - window)
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
local previous = tonumber(redis.call('HGET', KEYS[2], id) or '0')
if used - previous + amount > limit then return {0, used, oldest(window)} end
redis.call('ZADD', KEYS[1], now, id)
redis.call('HSET', KEYS[2], id, amount)
used = redis.call('INCRBY', KEYS[3], amount - previous)
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], window) end
return {1, used, oldest(window)}`,

  /** Puts back a reservation made elsewhere (on a fallback store while Redis was away), without a limit. ARGV: id, amount, at, window. */
  absorbQuota: `${NOW}${PRUNE}
local id, amount, at, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
prune(now - window)
if at <= now - window or redis.call('HEXISTS', KEYS[2], id) == 1 then return 0 end
redis.call('ZADD', KEYS[1], at, id)
redis.call('HSET', KEYS[2], id, amount)
redis.call('INCRBY', KEYS[3], amount)
-- Only ever lengthen the keys' life: newer entries may need them longer than this old one does.
local keep = math.max(1, at + window - now)
for i = 1, 3 do
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl < keep then redis.call('PEXPIRE', KEYS[i], keep) end
end
return 1`,

  /** ARGV: id. */
  releaseQuota: `local amount = redis.call('HGET', KEYS[2], ARGV[1])
if not amount then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DECRBY', KEYS[3], amount)
return 1`,

  /** ARGV: window. Returns {used, resetsAt or -1}. */
  quotaUsage: `${NOW}${PRUNE}
local window = tonumber(ARGV[1])
prune(now - window)
return {tonumber(redis.call('GET', KEYS[3]) or '0'), oldest(window)}`,

  /**
   * A hash: failures, signals (back-off signals in a row), until, code, response, at.
   * ARGV: code, has response (1/0), response, at, baseMs ('' = no cooldown), maxMs. Returns {failures, until or -1}.
   */
  recordFailure: `${NOW}
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
redis.call('HSET', KEYS[1], 'code', ARGV[1], 'at', ARGV[4])
if ARGV[2] == '1' then redis.call('HSET', KEYS[1], 'response', ARGV[3]) else redis.call('HDEL', KEYS[1], 'response') end
local untilMs = tonumber(redis.call('HGET', KEYS[1], 'until') or '-1')
if ARGV[5] ~= '' then
  local signals = redis.call('HINCRBY', KEYS[1], 'signals', 1)
  local pause = math.min(tonumber(ARGV[6]), tonumber(ARGV[5]) * 2 ^ math.min(signals - 1, 40))
  untilMs = now + math.floor(pause)
  redis.call('HSET', KEYS[1], 'until', string.format('%.0f', untilMs))
end
redis.call('PEXPIRE', KEYS[1], math.max(0, untilMs - now) + 86400000)
if untilMs <= now then untilMs = -1 end
return {failures, untilMs}`,

  /** Returns {now, HGETALL}. */
  health: `${NOW}
return {now, redis.call('HGETALL', KEYS[1])}`,

  /** INCR and PEXPIRE as one step. ARGV: window. */
  recordLoginFailure: `local count = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return count`,

  /**
   * ARGV: by, ttl ('' = none). A ttl applies when the key is created, as a counter window. With a scope
   * (KEYS[2], ARGV: maxKeys, member) a key it creates must fit in the scope.
   */
  incr: `${NOW}${ADMIT}
local current = redis.call('GET', KEYS[1])
local value = 0
if current then
  value = tonumber(current)
  if value == nil or value ~= math.floor(value) or math.abs(value) > 9007199254740991 then return redis.error_reply('SMTPMUX_NOT_INTEGER') end
end
local sum = value + tonumber(ARGV[1])
if math.abs(sum) > 9007199254740991 then return redis.error_reply('SMTPMUX_NOT_INTEGER') end
local nextValue = string.format('%.0f', sum)
if not current and not admit(ARGV[2]) then return redis.error_reply('SMTPMUX_STATE_FULL') end
if current then
  redis.call('SET', KEYS[1], nextValue, 'KEEPTTL')
elseif ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], nextValue, 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], nextValue)
end
return nextValue`,
} as const;

type ScriptName = keyof typeof SCRIPTS;

const SHA1 = Object.fromEntries(Object.entries(SCRIPTS).map(([name, source]) => [name, createHash('sha1').update(source).digest('hex')])) as Record<ScriptName, string>;

/** A positive whole number of milliseconds for PX/PEXPIRE. */
const px = (ms: number): string => String(Math.max(1, Math.ceil(ms)));

/** The part of node-redis's client this store uses. */
interface Client {
  readonly isOpen: boolean;
  readonly isReady: boolean;
  sendCommand(args: string[]): Promise<unknown>;
  close(): Promise<unknown>;
  destroy(): void;
}

export class RedisStateStore implements StateStore {
  private closed = false;

  private constructor(
    private readonly client: Client,
    private readonly options: RedisStateOptions,
  ) {}

  /**
   * Creates the client and starts connecting; never rejects because Redis is away (calls fail fast
   * until it is reachable, and the client keeps reconnecting with backoff). `onConnectionError` hears
   * the client's socket errors, which must not go unheard (an EventEmitter 'error').
   */
  static create(options: RedisStateOptions, onConnectionError: (err: Error) => void = () => undefined): RedisStateStore {
    const client = createClient({
      url: options.url,
      // A command while disconnected fails at once instead of waiting in a queue for a server that may not come back.
      disableOfflineQueue: true,
      // Bounds what piles up behind a server that stopped answering.
      commandsQueueMaxLength: 10_000,
      socket: {
        connectTimeout: Math.max(options.timeoutMs, 1000),
        // Exponential backoff with jitter, 50 ms up to 2 s, for ever: the proxy never gives up on Redis.
        reconnectStrategy: (retries: number) => Math.min(2000, 50 * 2 ** Math.min(retries, 6)) + Math.floor(Math.random() * 50),
      },
    });
    client.on('error', (err: Error) => onConnectionError(err));
    client.connect().catch(() => undefined); // the 'error' listener has it; reconnecting goes on
    return new RedisStateStore(client as unknown as Client, options);
  }

  /** Waits until the connection is ready or `ms` passed; true when ready. */
  async ready(ms: number): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (!this.client.isReady && Date.now() < deadline && !this.closed) await new Promise((r) => setTimeout(r, 20));
    return this.client.isReady;
  }

  /** One round trip, under the same deadline as any other call. */
  async ping(): Promise<void> {
    await this.command(['PING']);
  }

  async acquireRate(key: string, limit: number, periodMs: number, maxWaitMs: number, cost: number): Promise<RateGrant> {
    const [ok, ms] = (await this.script('acquireRate', [this.key('rate', key)], [String(periodMs / limit), String(maxWaitMs), String(cost)])) as [number, number];
    return ok === 1 ? { ok: true, waitMs: ms } : { ok: false, retryInMs: ms };
  }

  async rateAvailable(key: string, limit: number, periodMs: number): Promise<number> {
    return (await this.script('rateAvailable', [this.key('rate', key)], [String(limit), String(periodMs)])) as number;
  }

  async reserveQuota(key: string, id: string, amount: number, limit: number, windowMs: number): Promise<QuotaGrant> {
    const [ok, used, resetsAt] = (await this.script('reserveQuota', this.quotaKeys(key), [id, String(amount), String(limit), String(Math.ceil(windowMs))])) as number[];
    return { ok: ok === 1, used, resetsAt: resetsAt < 0 ? null : resetsAt };
  }

  /** Adds a reservation taken while Redis was away, with its original time, whatever the limit (it happened). */
  async absorbQuota(key: string, id: string, amount: number, at: number, windowMs: number): Promise<void> {
    await this.script('absorbQuota', this.quotaKeys(key), [id, String(amount), String(Math.floor(at)), String(Math.ceil(windowMs))]);
  }

  async releaseQuota(key: string, id: string): Promise<void> {
    await this.script('releaseQuota', this.quotaKeys(key), [id]);
  }

  async quotaUsage(key: string, windowMs: number): Promise<QuotaSnapshot> {
    const [used, resetsAt] = (await this.script('quotaUsage', this.quotaKeys(key), [String(Math.ceil(windowMs))])) as number[];
    return { used, resetsAt: resetsAt < 0 ? null : resetsAt };
  }

  async recordFailure(key: string, error: LastError, cooldown: { baseMs: number; maxMs: number } | null): Promise<HealthSnapshot> {
    const args = [error.code, error.response === undefined ? '0' : '1', error.response ?? '', String(error.at), cooldown ? String(cooldown.baseMs) : '', cooldown ? String(cooldown.maxMs) : ''];
    const [failures, until] = (await this.script('recordFailure', [this.key('health', key)], args)) as number[];
    return { failures, cooldownUntil: until < 0 ? null : until, lastError: error };
  }

  async recordSuccess(key: string): Promise<void> {
    await this.command(['DEL', this.key('health', key)]);
  }

  async health(key: string): Promise<HealthSnapshot> {
    const [now, flat] = (await this.script('health', [this.key('health', key)], [])) as [number, string[]];
    const fields = new Map<string, string>();
    for (let i = 0; i + 1 < flat.length; i += 2) fields.set(flat[i], flat[i + 1]);
    if (!fields.has('failures')) return { failures: 0, cooldownUntil: null, lastError: null };
    const until = Number(fields.get('until') ?? -1);
    const response = fields.get('response');
    return {
      failures: Number(fields.get('failures')),
      cooldownUntil: until > now ? until : null,
      lastError: { code: fields.get('code') ?? '', ...(response === undefined ? {} : { response }), at: Number(fields.get('at')) },
    };
  }

  async recordLoginFailure(key: string, windowMs: number): Promise<number> {
    return (await this.script('recordLoginFailure', [this.key('login', key)], [px(windowMs)])) as number;
  }

  async loginFailures(key: string): Promise<number> {
    return Number((await this.command(['GET', this.key('login', key)])) ?? 0);
  }

  async clearLoginFailures(key: string): Promise<void> {
    await this.command(['DEL', this.key('login', key)]);
  }

  async get(key: string): Promise<string | undefined> {
    return ((await this.command(['GET', this.key('value', key)])) as string | null) ?? undefined;
  }

  async set(key: string, json: string, ttlMs?: number, scope?: StateScope): Promise<void> {
    if (ttlMs !== undefined && ttlMs <= 0) await this.command(['DEL', this.key('value', key)]);
    else if (scope) await this.scoped('scopedSet', key, [json, ttlMs === undefined ? '' : px(ttlMs)], scope);
    else await this.command(['SET', this.key('value', key), json, ...(ttlMs === undefined ? [] : ['PX', px(ttlMs)])]);
  }

  async incr(key: string, by: number, ttlMs?: number, scope?: StateScope): Promise<number> {
    try {
      const args = [String(by), ttlMs === undefined ? '' : px(ttlMs)];
      return Number(scope ? await this.scoped('incr', key, args, scope) : await this.script('incr', [this.key('value', key)], args));
    } catch (err) {
      if (err instanceof StateUnavailableError && err.message.includes('SMTPMUX_NOT_INTEGER')) throw new StateTypeError(key);
      throw err;
    }
  }

  /** A value script with the key's scope: one sorted set per scope (a Redis Cluster would need the key and its scope in one slot). */
  private async scoped(name: ScriptName, key: string, args: string[], scope: StateScope): Promise<unknown> {
    try {
      return await this.script(name, [this.key('value', key), this.key('scope', scope.name)], [...args, String(scope.maxKeys), key]);
    } catch (err) {
      if (err instanceof StateUnavailableError && err.message.includes('SMTPMUX_STATE_FULL')) throw new StateFullError(scope.name);
      throw err;
    }
  }

  status(): StateStatus {
    return { backend: 'redis', shared: true, degraded: !this.client.isReady, since: null, reason: this.client.isReady ? null : 'not connected', localOperations: 0 };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (!this.client.isOpen) return;
    // close() waits for replies in flight; a server that stopped answering would hold it for ever.
    await Promise.race([this.client.close().catch(() => undefined), new Promise((r) => setTimeout(r, this.options.timeoutMs).unref())]);
    this.client.destroy();
  }

  /** The Redis key: prefix, kind, and the caller's key in braces (a hash tag: the keys of one quota hash together). */
  private key(kind: string, key: string): string {
    return `${this.options.prefix}${kind}:{${key}}`;
  }

  private quotaKeys(key: string): string[] {
    const base = this.key('quota', key);
    return [`${base}:at`, `${base}:amount`, `${base}:total`];
  }

  private async script(name: ScriptName, keys: string[], args: string[]): Promise<unknown> {
    const tail = [String(keys.length), ...keys, ...args];
    try {
      return await this.command(['EVALSHA', SHA1[name], ...tail]);
    } catch (err) {
      // First use on this server (or after a restart or SCRIPT FLUSH): EVAL runs it and caches it.
      if (err instanceof StateUnavailableError && err.message.startsWith('NOSCRIPT')) return this.command(['EVAL', SCRIPTS[name], ...tail]);
      throw err;
    }
  }

  /** One command under our deadline; every failure becomes StateUnavailableError. */
  private command(args: string[]): Promise<unknown> {
    if (this.closed) return Promise.reject(new StateUnavailableError('the Redis state store is closed'));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new StateUnavailableError(`Redis did not answer within ${this.options.timeoutMs} ms`)), this.options.timeoutMs);
      this.client.sendCommand(args).then(
        (reply) => {
          clearTimeout(timer);
          resolve(reply);
        },
        (err: Error) => {
          clearTimeout(timer);
          reject(new StateUnavailableError(err?.message ?? String(err)));
        },
      );
    });
  }
}
