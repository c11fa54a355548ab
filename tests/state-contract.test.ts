// The same behavioural checks against both StateStore backends, so the in-process store and the Redis
// one provably agree: rate pacing, quota exactness under concurrency, release, cooldown doubling and
// clearing, login counters that expire, and ctx.state's get/set/incr with ttl.
import { MemoryStateStore } from '../src/state/memory';
import { RedisStateStore } from '../src/state/redis';
import { StateFullError, StateTypeError, type StateStore } from '../src/state/store';
import { startRedis, type RedisServer } from './support/redis';

let redis: RedisServer;
const opened: StateStore[] = [];

beforeAll(async () => {
  redis = await startRedis();
});

afterAll(async () => {
  for (const store of opened) await store.close();
  await redis?.stop();
});

async function redisStore(prefix = 'contract:'): Promise<RedisStateStore> {
  const store = RedisStateStore.create({ url: redis.url, prefix, timeoutMs: 2000 });
  opened.push(store);
  expect(await store.ready(5000)).toBe(true);
  return store;
}

const backends: [string, () => Promise<StateStore>][] = [
  ['memory', async () => new MemoryStateStore()],
  ['redis', () => redisStore()],
];

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
let counter = 0;
/** A key no other test uses. */
const fresh = (what: string): string => `${what}:${process.pid}:${++counter}`;

describe.each(backends)('%s backend', (_name, make) => {
  let store: StateStore;
  beforeAll(async () => {
    store = await make();
  });

  test('rate: slots are spaced period/limit apart, and a slot beyond the allowed wait is refused without reserving', async () => {
    const key = fresh('rate');
    // 10 per 10 s: one slot a second.
    expect(await store.rateAvailable(key, 10, 10_000)).toBe(10);
    expect(await store.acquireRate(key, 10, 10_000, 0, 1)).toEqual({ ok: true, waitMs: 0 });
    const refused = await store.acquireRate(key, 10, 10_000, 0, 1);
    expect(refused.ok).toBe(false);
    if (!refused.ok) expect(refused.retryInMs).toBeGreaterThan(500);
    if (!refused.ok) expect(refused.retryInMs).toBeLessThanOrEqual(1000);
    expect(await store.rateAvailable(key, 10, 10_000)).toBe(9);
    const paced = await store.acquireRate(key, 10, 10_000, 5000, 1);
    expect(paced.ok).toBe(true);
    if (paced.ok) expect(paced.waitMs).toBeGreaterThan(500);
    if (paced.ok) expect(paced.waitMs).toBeLessThanOrEqual(1000);
    expect(await store.rateAvailable(key, 10, 10_000)).toBe(8);
  });

  test('rate: 20 concurrent acquisitions get distinct slots, and only those within the wait', async () => {
    const key = fresh('rate');
    const grants = await Promise.all(Array.from({ length: 20 }, () => store.acquireRate(key, 10, 10_000, 5000, 1)));
    const waits = grants.filter((g) => g.ok).map((g) => (g.ok ? Math.round(g.waitMs / 1000) : -1));
    // Slots at 0, 1, ... 5 s: six fit within a 5 s wait.
    expect(waits.sort((a, b) => a - b)).toEqual([0, 1, 2, 3, 4, 5]);
    expect(grants.filter((g) => !g.ok)).toHaveLength(14);
  });

  test('rate: a cost takes that many slots, and the next caller waits for all of them', async () => {
    const key = fresh('rate');
    // 10 per 10 s: one slot a second; three recipients take three.
    expect(await store.acquireRate(key, 10, 10_000, 5000, 3)).toEqual({ ok: true, waitMs: 0 });
    const next = await store.acquireRate(key, 10, 10_000, 5000, 1);
    expect(next.ok).toBe(true);
    if (next.ok) expect(next.waitMs).toBeGreaterThan(2500);
    if (next.ok) expect(next.waitMs).toBeLessThanOrEqual(3000);
    expect(await store.rateAvailable(key, 10, 10_000)).toBe(6);
  });

  test('quota: 50 concurrent reservations against a limit of 5 grant exactly 5', async () => {
    const key = fresh('quota');
    const before = Date.now();
    const grants = await Promise.all(Array.from({ length: 50 }, (_, i) => store.reserveQuota(key, `m${i}`, 1, 5, 60_000)));
    expect(grants.filter((g) => g.ok)).toHaveLength(5);
    const usage = await store.quotaUsage(key, 60_000);
    expect(usage.used).toBe(5);
    expect(usage.resetsAt).toBeGreaterThanOrEqual(before + 60_000 - 50);
    expect(usage.resetsAt).toBeLessThanOrEqual(Date.now() + 60_000 + 50);
    const refused = grants.find((g) => !g.ok)!;
    expect(refused.used).toBe(5);
  });

  test('quota: a release gives the amount back, an unknown id is ignored, and amounts count', async () => {
    const key = fresh('quota');
    expect((await store.reserveQuota(key, 'a', 3, 5, 60_000)).ok).toBe(true);
    const over = await store.reserveQuota(key, 'b', 3, 5, 60_000);
    expect(over).toMatchObject({ ok: false, used: 3 });
    expect(await store.reserveQuota(key, 'c', 2, 5, 60_000)).toMatchObject({ ok: true, used: 5 });
    await store.releaseQuota(key, 'nobody');
    expect((await store.quotaUsage(key, 60_000)).used).toBe(5);
    await store.releaseQuota(key, 'a');
    expect((await store.quotaUsage(key, 60_000)).used).toBe(2);
    expect(await store.reserveQuota(key, 'b', 3, 5, 60_000)).toMatchObject({ ok: true, used: 5 });
    expect(await store.quotaUsage(fresh('quota'), 60_000)).toEqual({ used: 0, resetsAt: null });
  });

  test('quota: the window rolls; entries leave it one by one', async () => {
    const key = fresh('quota');
    expect((await store.reserveQuota(key, 'a', 1, 2, 400)).ok).toBe(true);
    await sleep(150);
    expect((await store.reserveQuota(key, 'b', 1, 2, 400)).ok).toBe(true);
    expect((await store.reserveQuota(key, 'c', 1, 2, 400)).ok).toBe(false);
    await sleep(300); // a has left the window, b has not
    expect(await store.reserveQuota(key, 'c', 1, 2, 400)).toMatchObject({ ok: true, used: 2 });
    expect((await store.reserveQuota(key, 'd', 1, 2, 400)).ok).toBe(false);
  });

  test('cooldown: back-off signals double the pause up to the maximum; other failures only count; a success clears it', async () => {
    const key = fresh('ds');
    const cooldown = { baseMs: 10_000, maxMs: 30_000 };
    const at = Date.now();
    const first = await store.recordFailure(key, { code: 'ECONNECTION', at }, cooldown);
    expect(first.failures).toBe(1);
    expect(first.cooldownUntil! - Date.now()).toBeGreaterThan(9_000);
    expect(first.cooldownUntil! - Date.now()).toBeLessThanOrEqual(10_000);
    const second = await store.recordFailure(key, { code: 'EPROTOCOL', response: '421 4.7.0 try later', at }, cooldown);
    expect(second.cooldownUntil! - Date.now()).toBeGreaterThan(19_000);
    expect(second.cooldownUntil! - Date.now()).toBeLessThanOrEqual(20_000);
    const third = await store.recordFailure(key, { code: 'EPROTOCOL', response: '454 Throttling failure', at }, cooldown);
    expect(third.cooldownUntil! - Date.now()).toBeGreaterThan(29_000);
    expect(third.cooldownUntil! - Date.now()).toBeLessThanOrEqual(30_000);
    const fourth = await store.recordFailure(key, { code: 'EENVELOPE', response: '550 no such user', at }, null);
    expect(fourth.failures).toBe(4);
    expect(fourth.cooldownUntil).toBe(third.cooldownUntil);
    expect(await store.health(key)).toEqual({ failures: 4, cooldownUntil: third.cooldownUntil, lastError: { code: 'EENVELOPE', response: '550 no such user', at } });
    await store.recordSuccess(key);
    expect(await store.health(key)).toEqual({ failures: 0, cooldownUntil: null, lastError: null });
    const again = await store.recordFailure(key, { code: 'ECONNECTION', at }, cooldown);
    expect(again.cooldownUntil! - Date.now()).toBeLessThanOrEqual(10_000);
    expect(again.lastError).toEqual({ code: 'ECONNECTION', at });
    expect((await store.health(key)).lastError).toEqual({ code: 'ECONNECTION', at });
  });

  test('cooldown: a pause that ended is reported as up, with the failures kept', async () => {
    const key = fresh('ds');
    await store.recordFailure(key, { code: 'ETIMEDOUT', at: Date.now() }, { baseMs: 100, maxMs: 1000 });
    expect((await store.health(key)).cooldownUntil).not.toBeNull();
    await sleep(150);
    expect(await store.health(key)).toMatchObject({ failures: 1, cooldownUntil: null });
  });

  test('login failures count up, expire a window after the last one, and clear', async () => {
    const key = fresh('login:ip');
    expect(await store.recordLoginFailure(key, 400)).toBe(1);
    expect(await store.recordLoginFailure(key, 400)).toBe(2);
    await sleep(200);
    expect(await store.recordLoginFailure(key, 400)).toBe(3); // extends the window
    await sleep(250);
    expect(await store.loginFailures(key)).toBe(3);
    await sleep(250);
    expect(await store.loginFailures(key)).toBe(0);
    await store.recordLoginFailure(key, 60_000);
    await store.clearLoginFailures(key);
    expect(await store.loginFailures(key)).toBe(0);
  });

  test('values: get/set with and without ttl', async () => {
    const key = fresh('sel:u');
    expect(await store.get(key)).toBeUndefined();
    await store.set(key, '{"a":[1,2]}');
    expect(await store.get(key)).toBe('{"a":[1,2]}');
    await store.set(key, '"short"', 200);
    expect(await store.get(key)).toBe('"short"');
    await sleep(250);
    expect(await store.get(key)).toBeUndefined();
    await store.set(key, '1', 100);
    await store.set(key, '2'); // a set without ttl keeps the value for good
    await sleep(150);
    expect(await store.get(key)).toBe('2');
  });

  test('values: incr counts from 0, its ttl opens a window at creation, and refuses what is not an integer', async () => {
    const key = fresh('sel:u');
    expect(await store.incr(key, 1)).toBe(1);
    expect(await store.incr(key, 5)).toBe(6);
    expect(await store.incr(key, -7)).toBe(-1);
    expect(await store.get(key)).toBe('-1');
    const windowed = fresh('sel:u');
    expect(await store.incr(windowed, 1, 300)).toBe(1);
    await sleep(150);
    expect(await store.incr(windowed, 1, 300)).toBe(2); // does not extend the window
    await sleep(200);
    expect(await store.get(windowed)).toBeUndefined();
    const text = fresh('sel:u');
    await store.set(text, '"x"');
    await expect(store.incr(text, 1)).rejects.toBeInstanceOf(StateTypeError);
    await store.set(text, '1.5');
    await expect(store.incr(text, 1)).rejects.toBeInstanceOf(StateTypeError);
    expect(await store.get(text)).toBe('1.5');
  });

  test('values: a scope holds at most maxKeys live keys; its keys stay writable, and an expired one frees its place', async () => {
    const scope = { name: fresh('sel:scope'), maxKeys: 2 };
    const k = (name: string): string => `${scope.name}:${name}`;
    await store.set(k('a'), '1', 200, scope);
    expect(await store.incr(k('b'), 1, undefined, scope)).toBe(1);
    await expect(store.set(k('c'), '1', undefined, scope)).rejects.toBeInstanceOf(StateFullError);
    await expect(store.incr(k('c'), 1, undefined, scope)).rejects.toBeInstanceOf(StateFullError);
    expect(await store.get(k('c'))).toBeUndefined();
    await store.set(k('b'), '5', undefined, scope);
    expect(await store.incr(k('b'), 1, undefined, scope)).toBe(6);
    await sleep(250);
    await store.set(k('c'), '"in"', undefined, scope);
    expect(await store.get(k('c'))).toBe('"in"');
    await expect(store.incr(k('d'), 1, undefined, scope)).rejects.toBeInstanceOf(StateFullError);
  });

  test('values: 50 concurrent increments each see a distinct value', async () => {
    const key = fresh('sel:u');
    const values = await Promise.all(Array.from({ length: 50 }, () => store.incr(key, 1)));
    expect(new Set(values).size).toBe(50);
    expect(Math.max(...values)).toBe(50);
  });
});

describe('redis backend across instances', () => {
  test('two stores with the same prefix share one quota: 2 × 25 concurrent reservations grant 5', async () => {
    const [a, b] = [await redisStore('shared:'), await redisStore('shared:')];
    const key = fresh('quota');
    const grants = await Promise.all(Array.from({ length: 50 }, (_, i) => (i % 2 ? a : b).reserveQuota(key, `m${i}`, 1, 5, 60_000)));
    expect(grants.filter((g) => g.ok)).toHaveLength(5);
    expect(await a.incr('rr', 1)).toBe(1);
    expect(await b.incr('rr', 1)).toBe(2);
  });

  test('different prefixes keep deployments apart, and every key carries its prefix', async () => {
    const [a, b] = [await redisStore('one:'), await redisStore('two:')];
    await a.set('k', '"a"');
    expect(await b.get('k')).toBeUndefined();
    await a.reserveQuota('ds:x', 'id', 1, 1, 60_000);
    expect((await b.reserveQuota('ds:x', 'id', 1, 1, 60_000)).ok).toBe(true);
    const keys = (await redis.cli('--scan')).split('\n').filter(Boolean);
    expect(keys.length).toBeGreaterThan(0);
    expect(keys.filter((k) => !/^(contract|shared|one|two):/.test(k))).toEqual([]);
  });

  test('a reservation written back after an outage counts once, keeps its time, and never shortens the window', async () => {
    const store = await redisStore('absorb:');
    const now = Date.now();
    expect((await store.reserveQuota('ds:q', 'fresh', 1, 3, 60_000)).ok).toBe(true);
    await store.absorbQuota('ds:q', 'old', 1, now - 59_000, 60_000);
    await store.absorbQuota('ds:q', 'old', 1, now - 59_000, 60_000); // twice: counted once
    await store.absorbQuota('ds:q', 'gone', 1, now - 61_000, 60_000); // already out of the window
    const usage = await store.quotaUsage('ds:q', 60_000);
    expect(usage.used).toBe(2);
    expect(usage.resetsAt).toBeLessThanOrEqual(now + 1_000 + 50);
    for (const part of ['at', 'amount', 'total']) expect(Number(await redis.cli('PTTL', `absorb:quota:{ds:q}:${part}`))).toBeGreaterThan(50_000);
    expect((await store.reserveQuota('ds:q', 'one-more', 1, 3, 60_000)).ok).toBe(true);
    expect((await store.reserveQuota('ds:q', 'too-many', 1, 3, 60_000)).ok).toBe(false);
  });

  test('no key lives for ever unless a selector set it without ttl', async () => {
    const store = await redisStore('ttl:');
    // Every key here lives a minute at least, so none can expire between the scan and its PTTL on a loaded machine.
    await store.acquireRate('ds:r', 1, 60_000, 0, 1);
    await store.reserveQuota('ds:q', 'id', 1, 5, 60_000);
    await store.recordFailure('ds:h', { code: 'ECONNECTION', at: Date.now() }, { baseMs: 60_000, maxMs: 120_000 });
    await store.recordLoginFailure('login:ip:1.2.3.4', 60_000);
    await store.incr('sel:c', 1, 60_000);
    const keys = (await redis.cli('--scan', '--pattern', 'ttl:*')).split('\n').filter(Boolean);
    expect(keys).toHaveLength(7);
    for (const key of keys) expect(Number(await redis.cli('PTTL', key))).toBeGreaterThan(0);
  });
});
