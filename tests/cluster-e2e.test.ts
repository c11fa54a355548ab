// Two SMTP Mux processes (`node dist/cli.js serve`, the way they run in production) sharing one real
// redis-server: what one instance counts, the other honours; when Redis dies mid-load no message is
// lost and both go on with local limits; when it comes back, limits are shared again without a restart.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { envWithout, startServe, type ServeProcess } from './support/cli';
import { sendWithNodemailer } from './support/clients';
import { testConfig, TEST_LIMITS } from './support/config';
import { startDownstream, type Downstream } from './support/downstream';
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

/** Starts `count` instances on one config; each gets its own file so each can be edited alone. */
async function startInstances(name: string, config: string, count = 2): Promise<ServeProcess[]> {
  const instances: ServeProcess[] = [];
  for (let i = 0; i < count; i++) {
    const file = path.join(dir, `${name}-${i}.yaml`);
    writeFileSync(file, config);
    const p = await startServe(file, env());
    running.push(p);
    instances.push(p);
  }
  return instances;
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
    // Log lines are written asynchronously: wait for them, then count.
    const delivered = (p: ServeProcess): number => p.stdout().match(/"message delivered"/g)?.length ?? 0;
    for (const p of [a, b]) await p.waitFor(/"message delivered"(?:[^]*"message delivered"){4}/);
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

test('ctx.state.incr is one rotation across both instances: round-robin.js alternates whichever instance takes the message', async () => {
  const first = await startDownstream();
  const second = await startDownstream();
  try {
    const config = testConfig({
      selector: 'round-robin.js',
      downstreams: [
        { name: 'first', addr: first.addr },
        { name: 'second', addr: second.addr },
      ],
      ...TEST_LIMITS,
      state: { redis: redis.url, prefix: 'e2e-rotation:' },
    });
    const [a, b] = await startInstances('rotation', config);
    const order: string[] = [];
    for (let i = 0; i < 6; i++) {
      // A, B, A, B...: per-instance counters would give first, first, second, second...
      const before = first.received.length;
      expect((await sendWithNodemailer((i % 2 ? b : a).port, { subject: `turn ${i}` })).ok).toBe(true);
      order.push(first.received.length > before ? 'first' : 'second');
    }
    expect(order).toEqual(['first', 'second', 'first', 'second', 'first', 'second']);
    expect(await redis.cli('GET', 'e2e-rotation:value:{sel:test@user.com:round-robin}')).toBe('6');
    await stopAll([a, b]);
  } finally {
    await first.close();
    await second.close();
  }
});
