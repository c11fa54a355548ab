// When Redis is down, slow or hung the state store keeps answering from a local store (limits per
// instance), says so, and goes back to the shared limits when Redis returns, handing it what it did meanwhile.
import { Writable } from 'node:stream';
import { createLogger } from '../src/observe/logger';
import { createStateStore } from '../src/state/create';
import { StateTypeError, type StateStore } from '../src/state/store';
import { freePort, startRedis, type RedisServer } from './support/redis';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function capture() {
  const lines: { level: number; msg: string; [k: string]: unknown }[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const line of chunk.toString('utf8').split('\n')) if (line.trim()) lines.push(JSON.parse(line));
      done();
    },
  });
  return { logger: createLogger({ level: 'debug', destination }), lines };
}

async function until(check: () => boolean | Promise<boolean>, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(25);
  }
}

const stores: StateStore[] = [];
const servers: RedisServer[] = [];

/** The store as the App makes it (started: it waited for Redis up to a second), with a quick probe. */
async function fallbackFor(url: string, options: { timeoutMs?: number } = {}) {
  const { logger, lines } = capture();
  const timeoutMs = options.timeoutMs ?? 300;
  const store = await createStateStore({ redis: url, prefix: 'fb:', timeoutMs }, logger, { minProbeMs: 50, maxProbeMs: 400 });
  stores.push(store);
  return { store, lines };
}

afterAll(async () => {
  for (const store of stores) await store.close();
  for (const server of servers) await server.stop();
});

test('a store started while Redis is away serves locally, and turns shared when Redis comes up', async () => {
  const port = await freePort();
  const { store, lines } = await fallbackFor(`redis://127.0.0.1:${port}`);
  expect(store.status()).toMatchObject({ backend: 'redis', shared: false, degraded: true });
  expect(await store.incr('rr', 1)).toBe(1);
  expect(store.status().localOperations).toBe(1);
  expect(lines.some((l) => l.level === 40 && /per instance/.test(l.msg))).toBe(true);

  const redis = await startRedis();
  servers.push(redis);
  // A second store on the new server's port: the first one's port was only reserved, not served.
  const second = await fallbackFor(redis.url);
  expect(second.store.status()).toMatchObject({ shared: true, degraded: false, since: null });
  expect(await second.store.incr('rr', 1)).toBe(1);
});

test('Redis killed mid-use: quota goes on locally counting what this instance sent, and is written back when Redis returns', async () => {
  const redis = await startRedis();
  servers.push(redis);
  const { store, lines } = await fallbackFor(redis.url);
  const other = (await fallbackFor(redis.url)).store;
  expect(store.status().degraded).toBe(false);
  const window = 60_000;
  // This instance sends 2, another 2: the shared window holds 4 of 5.
  for (const id of ['a1', 'a2']) expect((await store.reserveQuota('ds:x', id, 1, 5, window)).ok).toBe(true);
  for (const id of ['b1', 'b2']) expect((await other.reserveQuota('ds:x', id, 1, 5, window)).ok).toBe(true);

  await redis.kill();
  // The lost connection alone turns it degraded, before any call (so an idle instance's status is true).
  await until(() => store.status().degraded && other.status().degraded, 5000, 'both stores to see the connection drop');
  // Per instance now: this one remembers its own 2, so 3 more fit here, not 5.
  const local = await Promise.all(['c1', 'c2', 'c3', 'c4'].map((id) => store.reserveQuota('ds:x', id, 1, 5, window)));
  expect(local.map((g) => g.ok)).toEqual([true, true, true, false]);
  expect(store.status()).toMatchObject({ degraded: true, shared: false });
  expect(store.status().reason).toBeTruthy();
  // One delivery of the outage failed: its reservation is given back.
  await store.releaseQuota('ds:x', 'c3');
  // Cooldowns and counters keep working.
  expect((await store.recordFailure('ds:y', { code: 'ECONNECTION', at: Date.now() }, { baseMs: 1000, maxMs: 2000 })).cooldownUntil).not.toBeNull();

  await redis.start(); // empty: nothing was saved
  await until(() => !store.status().degraded, 10_000, 'the store to recover');
  expect(lines.some((l) => l.level === 30 && /shared again/.test(l.msg) && l.quotaWrittenBack === 2)).toBe(true);
  // The shared window now holds what this instance sent during the outage (c1, c2).
  expect((await store.quotaUsage('ds:x', window)).used).toBe(2);
  expect(store.status().degraded).toBe(false);
  await until(async () => {
    await other.quotaUsage('ds:x', window);
    return !other.status().degraded;
  }, 10_000, 'the other store to recover');
  const after = await Promise.all(['d1', 'd2', 'd3', 'd4'].map((id) => other.reserveQuota('ds:x', id, 1, 5, window)));
  expect(after.filter((g) => g.ok)).toHaveLength(3);
});

test('a hung Redis (SIGSTOP) costs one call its deadline, then calls go local at once until it answers again', async () => {
  const redis = await startRedis();
  servers.push(redis);
  const { store } = await fallbackFor(redis.url, { timeoutMs: 200 });
  await store.set('k', '"shared"');
  redis.pause();
  try {
    let started = Date.now();
    expect(await store.incr('n', 1)).toBe(1); // timed out on Redis, answered locally
    expect(Date.now() - started).toBeLessThan(2000);
    expect(store.status().degraded).toBe(true);
    started = Date.now();
    for (let i = 0; i < 20; i++) await store.acquireRate('ds:r', 100, 1000, 1000, 1);
    expect(Date.now() - started).toBeLessThan(500);
  } finally {
    redis.resume();
  }
  await until(() => !store.status().degraded, 10_000, 'the store to recover');
  expect(await store.get('k')).toBe('"shared"');
});

test("a script's own refusal (incr on text) is the caller's error, not an outage", async () => {
  const redis = await startRedis();
  servers.push(redis);
  const { store } = await fallbackFor(redis.url);
  await store.set('t', '"text"');
  await expect(store.incr('t', 1)).rejects.toBeInstanceOf(StateTypeError);
  expect(store.status()).toMatchObject({ degraded: false, localOperations: 0 });
});
