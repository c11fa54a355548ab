// Two SMTP Mux processes (`node dist/cli.js serve`, the way they run in production) sharing one real
// redis-server: what one instance counts, the other honours; when Redis dies mid-load no message is
// lost and both go on with local limits; when it comes back, limits are shared again without a restart.
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { envWithout, startServe, type ServeProcess } from './support/cli';
import { sendWithNodemailer } from './support/clients';
import { testConfig, TEST_LIMITS } from './support/config';
import { startDownstream, type Downstream, type FailMode } from './support/downstream';
import { freePort, startRedis, type RedisServer } from './support/redis';

let dir: string;
let redis: RedisServer;
let inbox: Downstream;
const running: ServeProcess[] = [];

beforeAll(async () => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'smtpmux-cluster-'));
  redis = await startRedis();
  inbox = await startDownstream();
});

afterAll(async () => {
  for (const p of running) await p.kill();
  await inbox?.close();
  await redis?.stop();
  rmSync(dir, { recursive: true, force: true });
});

const env = (): NodeJS.ProcessEnv => envWithout('SMTPMUX_CONFIG', 'SMTPMUX_PORT', 'SMTPMUX_HOST', 'SMTPMUX_LOG_LEVEL');

/**
 * Starts `count` instances on one config. Each gets its own folder, as each machine of a cluster has its
 * own disk: paths relative to the config (a spool) are then per instance.
 */
async function startInstances(name: string, config: string, count = 2): Promise<ServeProcess[]> {
  const instances: ServeProcess[] = [];
  for (let i = 0; i < count; i++) {
    const file = path.join(dir, `${name}-${i}`, 'config.yaml');
    mkdirSync(path.dirname(file));
    writeFileSync(file, config);
    const p = await startServe(file, env());
    running.push(p);
    instances.push(p);
  }
  return instances;
}

async function until(check: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

async function stopAll(instances: ServeProcess[]): Promise<void> {
  for (const p of instances) {
    p.child.kill('SIGTERM');
    await p.exited;
  }
}

test('killing Redis mid-load loses no message; both instances go local and say so; a restarted Redis is shared again without a proxy restart', async () => {
  const config = testConfig({
    selector: 'round-robin.js',
    downstreams: [{ name: 'inbox', addr: inbox.addr }],
    ...TEST_LIMITS,
    state: { redis: redis.url, prefix: 'e2e-kill:', timeout_ms: 200 },
  });
  const [a, b] = await startInstances('kill', config);
  for (const p of [a, b]) await p.waitFor(/state: shared on Redis/);
  const before = inbox.received.length;
  const send = (p: ServeProcess, i: number) => sendWithNodemailer(p.port, { subject: `load ${i}` });

  // Ten messages over both instances, Redis killed after the first four have been sent.
  const results = [];
  for (let i = 0; i < 4; i++) results.push(await send(i % 2 ? b : a, i));
  await redis.kill();
  results.push(...(await Promise.all([4, 5, 6, 7, 8, 9].map((i) => send(i % 2 ? b : a, i)))));
  expect(results.map((r) => r.ok)).toEqual(Array(10).fill(true));
  expect(inbox.received.length - before).toBe(10);
  for (const p of [a, b]) await p.waitFor(/Redis is unreachable; limits are per instance/);

  await redis.start();
  for (const p of [a, b]) await p.waitFor(/Redis is back; limits are shared again/, 15_000);
  expect((await send(a, 10)).ok).toBe(true);
  expect(a.child.exitCode).toBeNull();
  expect(b.child.exitCode).toBeNull();
  await stopAll([a, b]);
});

/** HAProxy (the Debian package) in TCP mode in front of the instances, each connection with a PROXY v1 header. */
async function startHaproxy(backends: number[], source: string): Promise<{ port: number; stop(): Promise<void> }> {
  const port = await freePort();
  const cfg = path.join(dir, `haproxy-${port}.cfg`);
  writeFileSync(
    cfg,
    [
      // One thread: roundrobin then hands out backends in strict turn, which the spread below counts on.
      'global',
      '  nbthread 1',
      'defaults',
      '  mode tcp',
      '  timeout connect 2s',
      '  timeout client 30s',
      '  timeout server 30s',
      'frontend smtp',
      `  bind 127.0.0.1:${port}`,
      '  default_backend mux',
      'backend mux',
      '  balance roundrobin',
      // HAProxy connects from its own address, so an instance that ignored the PROXY header would see this one.
      `  source ${source}`,
      ...backends.map((p, i) => `  server mux${i} 127.0.0.1:${p} send-proxy`),
      '',
    ].join('\n'),
  );
  const bin = ['/usr/sbin/haproxy', '/usr/local/sbin/haproxy'].find((f) => existsSync(f)) ?? 'haproxy';
  const child = spawn(bin, ['-db', '-f', cfg], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
  const deadline = Date.now() + 10_000;
  while (!(await listening(port))) {
    if (child.exitCode !== null || Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`haproxy did not start: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    port,
    async stop() {
      if (child.exitCode === null) {
        child.kill('SIGKILL');
        await new Promise((r) => child.once('exit', r));
      }
    },
  };
}

function listening(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: '127.0.0.1', port }, () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

/** One message through `port` from the client address `from`. */
const sendFrom = (port: number, from: string, pass: string, subject: string) =>
  sendWithNodemailer(port, { subject }, { user: 'test@user.com', pass }, { localAddress: from });

test('behind HAProxy with PROXY protocol, both instances see the client address and share its login penalty; messages spread over both', async () => {
  const config = testConfig({
    selector: 'round-robin.js',
    downstreams: [{ name: 'inbox', addr: inbox.addr }],
    ...TEST_LIMITS,
    proxy_protocol: true,
    login_penalty: { failure_delay_ms: 50, free_failures: 10, lockout_failures: 4, window_ms: 60_000 },
    state: { redis: redis.url, prefix: 'e2e-haproxy:' },
  });
  const [a, b] = await startInstances('haproxy', config);
  const haproxy = await startHaproxy([a.port, b.port], '127.0.0.2');
  try {
    const before = inbox.received.length;
    // Ten messages from 127.0.0.3, one connection each: round robin puts five on each instance.
    for (let i = 0; i < 10; i++) expect(await sendFrom(haproxy.port, '127.0.0.3', 'password123', `lb ${i}`)).toMatchObject({ ok: true });
    expect(inbox.received.length - before).toBe(10);
    // Log lines are written in batches: wait for all ten over both instances, then count each one's.
    const delivered = (p: ServeProcess): number => p.stdout().match(/"message delivered"/g)?.length ?? 0;
    await until(() => delivered(a) + delivered(b) >= 10, 20_000, 'ten "message delivered" lines over both instances').catch((err: Error) => {
      throw new Error(`${err.message}: ${delivered(a)} from one, ${delivered(b)} from the other`);
    });
    expect([delivered(a), delivered(b)]).toEqual([5, 5]);

    // Four wrong passwords from 127.0.0.4, two on each instance: the shared count locks the address out
    // on both, the right password included.
    for (let i = 0; i < 4; i++) expect(await sendFrom(haproxy.port, '127.0.0.4', 'wrong', `guess ${i}`)).toMatchObject({ ok: false, code: 535 });
    for (let i = 0; i < 2; i++) {
      const locked = await sendFrom(haproxy.port, '127.0.0.4', 'password123', `locked ${i}`);
      expect(locked.ok).toBe(false);
      expect(String(locked.code)).toMatch(/^4/);
    }
    // The instances logged the client's address, never HAProxy's.
    for (const p of [a, b]) {
      await p.waitFor(/"remote":"127\.0\.0\.4"/);
      expect(p.stdout()).not.toContain('127.0.0.2');
    }
    // Another client is not affected.
    expect(await sendFrom(haproxy.port, '127.0.0.5', 'password123', 'other client')).toMatchObject({ ok: true });
  } finally {
    await haproxy.stop();
    await stopAll([a, b]);
  }
});

/** One message through an instance. */
const sent = (p: ServeProcess, subject: string) => sendWithNodemailer(p.port, { subject });

interface Setup {
  readonly a: ServeProcess;
  readonly b: ServeProcess;
  /** The test downstreams, by name. */
  readonly ds: Record<string, Downstream>;
  close(): Promise<void>;
}

/**
 * Test downstreams (each spec: its name, how it fails, and its config keys such as quota or cooldown)
 * behind two instances of one config whose state is on the test's Redis under its own prefix.
 */
async function setUp(
  name: string,
  selector: string,
  specs: { name: string; fail?: FailMode; [key: string]: unknown }[],
  state: Record<string, unknown> = {},
  more: { spool?: Record<string, unknown>; queue?: Record<string, unknown> } = {},
): Promise<Setup> {
  const ds: Record<string, Downstream> = {};
  for (const spec of specs) ds[spec.name] = await startDownstream(spec.fail ? { fail: spec.fail } : {});
  const config = testConfig({
    users: [{ selector, downstreams: specs.map(({ fail: _fail, ...keys }) => ({ ...keys, addr: ds[keys.name].addr })), ...(more.queue ? { queue: more.queue } : {}) }],
    ...TEST_LIMITS,
    state: { redis: redis.url, prefix: `e2e-${name}:`, ...state },
    ...(more.spool ? { spool: more.spool } : {}),
  });
  const [a, b] = await startInstances(name, config);
  return {
    a,
    b,
    ds,
    async close() {
      await stopAll([a, b]);
      for (const d of Object.values(ds)) await d.close();
    },
  };
}

test('ctx.state.incr is one rotation across both instances: round-robin.js alternates whichever instance takes the message', async () => {
  const { a, b, ds, close } = await setUp('rotation', 'round-robin.js', [{ name: 'first' }, { name: 'second' }]);
  try {
    const order: string[] = [];
    for (let i = 0; i < 6; i++) {
      // A, B, A, B...: per-instance counters would give first, first, second, second...
      const before = ds.first.received.length;
      expect((await sent(i % 2 ? b : a, `turn ${i}`)).ok).toBe(true);
      order.push(ds.first.received.length > before ? 'first' : 'second');
    }
    expect(order).toEqual(['first', 'second', 'first', 'second', 'first', 'second']);
    expect(await redis.cli('GET', 'e2e-rotation:value:{sel:test@user.com:round-robin}')).toBe('6');
  } finally {
    await close();
  }
});

test('two instances share a quota of 5 exactly: 10 messages over both, 5 to the limited downstream, 5 elsewhere', async () => {
  const { a, b, ds, close } = await setUp('quota', 'waterfall.js', [{ name: 'limited', quota: '5/1h' }, { name: 'other' }]);
  try {
    // Five at once on each instance: the reservations race on Redis. Ten apps, each from its own address:
    // ten logins at once from one address would be slowed by the login penalty, which counts an AUTH
    // from the moment it starts (see the closing note).
    const results = await Promise.all(
      Array.from({ length: 10 }, (_, i) => sendWithNodemailer((i % 2 ? b : a).port, { subject: `quota ${i}` }, undefined, { localAddress: `127.0.0.${10 + i}` })),
    );
    expect(results.map((r) => r.ok)).toEqual(Array(10).fill(true));
    expect(ds.limited.received).toHaveLength(5);
    expect(ds.other.received).toHaveLength(5);
  } finally {
    await close();
  }
});

test('a cooldown observed by one instance is honoured by the other: the failing downstream is contacted once', async () => {
  const { a, b, ds, close } = await setUp('cooldown', 'waterfall.js', [
    { name: 'flaky', cooldown: '60s', fail: { kind: 'reply', code: 421, message: '4.7.0 Try again later' } },
    { name: 'backup' },
  ]);
  try {
    expect((await sent(a, 'first')).ok).toBe(true);
    const contacted = ds.flaky.connections();
    expect(contacted).toBeGreaterThan(0);
    expect(ds.backup.received).toHaveLength(1);
    // The other instance never talked to flaky: only the shared cooldown can tell it to skip it.
    for (let i = 0; i < 3; i++) expect((await sent(b, `second ${i}`)).ok).toBe(true);
    expect(ds.flaky.connections()).toBe(contacted);
    expect(ds.backup.received).toHaveLength(4);
    // waterfall.js reads each downstream's state and leaves a cooling one out: B never even tried it.
    await b.waitFor(/"message delivered"(?:[^]*"message delivered"){2}/);
    expect(b.stdout()).not.toContain('"downstream":"flaky"');
  } finally {
    await close();
  }
});

test('Redis killed: the quota goes per instance (each counting what it sent); restarted: the instances write back and the quota is shared again', async () => {
  const { a, b, ds, close } = await setUp('degrade', 'waterfall.js', [{ name: 'limited', quota: '2/1h' }, { name: 'other' }], { timeout_ms: 200 });
  const counts = (): number[] => [ds.limited.received.length, ds.other.received.length];
  try {
    // Shared: one each, then the quota is full for both.
    for (const [p, s] of [[a, 'a1'], [b, 'b1'], [a, 'a2']] as const) expect((await sent(p, s)).ok).toBe(true);
    expect(counts()).toEqual([2, 1]);

    await redis.kill();
    for (const p of [a, b]) await p.waitFor(/Redis is unreachable/);
    // Per instance: each remembers the one it sent, so each allows one more of its quota of 2.
    for (const [p, s] of [[a, 'a3'], [a, 'a4'], [b, 'b2'], [b, 'b3']] as const) expect((await sent(p, s)).ok).toBe(true);
    expect(counts()).toEqual([4, 3]);

    await redis.start(); // empty: nothing was saved
    for (const p of [a, b]) await p.waitFor(/Redis is back; limits are shared again/, 15_000);
    // The outage's two deliveries were written back: the shared quota of 2 is full again.
    for (const [p, s] of [[a, 'a5'], [b, 'b4']] as const) expect((await sent(p, s)).ok).toBe(true);
    expect(counts()).toEqual([4, 5]);
  } finally {
    await close();
  }
});

test('each instance spools on its own disk and drains through the shared quota: 4 queued over both, 3 delivered for a quota of 3', async () => {
  const { a, b, ds, close } = await setUp(
    'spool',
    'waterfall.js',
    [{ name: 'limited', quota: '3/1h', fail: { kind: 'reply', code: 421, message: '4.3.2 Not now' } }],
    {},
    {
      spool: { poll_interval: '100ms' },
      queue: { first_retry: '300ms', max_retry: '600ms', max_age: '1h' },
    },
  );
  try {
    // The only downstream defers: every message is queued where it arrived, two on each instance.
    const replies = [];
    for (const [p, s] of [[a, 'a1'], [b, 'b1'], [a, 'a2'], [b, 'b2']] as const) replies.push(await sent(p, s));
    for (const r of replies) expect(r.response).toMatch(/^250 .*Queued as/);
    ds.limited.fail({ kind: 'none' });
    // Both spools retry; the shared quota lets three through in all (per instance, all four would go).
    await until(() => ds.limited.received.length >= 3, 20_000, 'three queued messages to be delivered');
    await Promise.race([a, b].map((p) => p.waitFor(/out of quota[^\n]*queued message not delivered yet/, 20_000)));
    expect(ds.limited.received).toHaveLength(3);
    const delivered = (p: ServeProcess): number => p.stdout().match(/queued message delivered/g)?.length ?? 0;
    expect(delivered(a) + delivered(b)).toBe(3);
  } finally {
    await close();
  }
});
