// Several instances, one set of limits: the `state` config, the App's one store that outlives reloads,
// and a relay that goes on when Redis is not there.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { parseConfig } from '../src/config/load';
import { testConfig, TEST_LIMITS } from './support/config';
import { startProxy } from './support/proxy';
import { startDownstream, type Downstream } from './support/downstream';
import { sendWithNodemailer } from './support/clients';
import { freePort, startRedis, type RedisServer } from './support/redis';

let redis: RedisServer;
let downstream: Downstream;
const SECRET = 'redis-secret-Zq8';

beforeAll(async () => {
  redis = await startRedis({ password: SECRET });
  downstream = await startDownstream();
});

afterAll(async () => {
  await downstream?.close();
  await redis?.stop();
});

const config = (state?: Record<string, unknown>): string =>
  testConfig({ selector: 'round-robin.js', downstreams: [{ name: 'a', addr: downstream.addr }], ...TEST_LIMITS, ...(state ? { state } : {}) });

describe('state config', () => {
  test('absent means in-process state; prefix and timeout have defaults', async () => {
    const parsed = await parseConfig(config(), '/tmp/cluster-config.yaml', {});
    expect(parsed.state).toEqual({ redis: undefined, prefix: 'smtpmux:', timeoutMs: 500 });
    const shared = await parseConfig(config({ redis: 'redis://10.0.0.5:6379/2', prefix: 'prod:', timeout_ms: 200 }), '/tmp/cluster-config.yaml', {});
    expect(shared.state).toEqual({ redis: 'redis://10.0.0.5:6379/2', prefix: 'prod:', timeoutMs: 200 });
  });

  test('a URL that is not redis:// is an error naming the key, without echoing the value', async () => {
    const text = config({ redis: 'http://user:hunter2@10.0.0.5:6379', timeout_ms: 0 });
    const failure = await parseConfig(text, '/tmp/cluster-config.yaml', {}).then(() => undefined, (err: Error) => err.message);
    expect(failure).toMatch(/state\.redis: must be a redis:\/\/ or rediss:\/\/ URL/);
    expect(failure).toMatch(/state\.timeout_ms: /);
    expect(failure).not.toContain('hunter2');
  });
});

describe('the App and its state store', () => {
  test('with state.redis the store is shared, survives a reload, and no log line shows the Redis password', async () => {
    const proxy = await startProxy({ 'config.yaml': config({ redis: redis.url, prefix: 'app:' }) });
    try {
      const state = proxy.app.state;
      expect(state.status()).toMatchObject({ backend: 'redis', shared: true, degraded: false });
      await state.set('k', '"v"');
      expect(await redis.cli('GET', 'app:value:{k}')).toBe('"v"');
      proxy.write('config.yaml', config({ redis: redis.url, prefix: 'other:' }));
      const reload = await proxy.app.reload('test');
      expect(reload.ok).toBe(true);
      expect(proxy.app.state).toBe(state);
      expect(proxy.logs.some((l) => JSON.stringify(l.needsRestart ?? '').includes('state'))).toBe(true);
      expect((await sendWithNodemailer(proxy.port, { subject: 'shared' })).ok).toBe(true);
      expect(proxy.logText()).toMatch(/state: shared on Redis/);
      expect(proxy.logText()).not.toContain(SECRET);
    } finally {
      await proxy.stop();
    }
  });

  test('with Redis unreachable the proxy starts degraded within about a second, relays, and says why', async () => {
    const port = await freePort();
    const started = Date.now();
    const proxy = await startProxy({ 'config.yaml': config({ redis: `redis://127.0.0.1:${port}`, timeout_ms: 100 }) });
    try {
      expect(Date.now() - started).toBeLessThan(10_000);
      expect(proxy.app.state.status()).toMatchObject({ backend: 'redis', shared: false, degraded: true });
      expect(proxy.logs.some((l) => l.level === 40 && /Redis is unreachable/.test(String(l.msg)))).toBe(true);
      // Readiness stays ready (losing Redis must not take the relay out of the balancer) and says why.
      expect(proxy.app.readiness()).toMatchObject({ ready: true, reason: expect.stringMatching(/^ready; degraded since .*limits are per instance/) });
      const before = downstream.received.length;
      expect((await sendWithNodemailer(proxy.port, { subject: 'no redis' })).ok).toBe(true);
      expect(downstream.received.length).toBe(before + 1);
    } finally {
      await proxy.stop();
    }
  });
});

describe('docker-compose.cluster.yml', () => {
  test("the instances' config validates, and names Redis from REDIS_URL", async () => {
    const file = path.join(__dirname, '..', 'config', 'cluster', 'config.yaml');
    const parsed = await parseConfig(readFileSync(file, 'utf8'), file, { REDIS_URL: 'redis://redis:6379/0' });
    expect(parsed.state).toMatchObject({ redis: 'redis://redis:6379/0', prefix: 'smtpmux:' });
    expect(parsed.listen.host).toBe('0.0.0.0');
  });
});
