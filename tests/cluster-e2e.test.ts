// Two SMTP Mux processes (`node dist/cli.js serve`, the way they run in production) sharing one real
// redis-server: what one instance counts, the other honours; when Redis dies mid-load no message is
// lost and both go on with local limits; when it comes back, limits are shared again without a restart.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { envWithout, startServe, type ServeProcess } from './support/cli';
import { sendWithNodemailer } from './support/clients';
import { testConfig, TEST_LIMITS } from './support/config';
import { startDownstream, type Downstream } from './support/downstream';
import { startRedis, type RedisServer } from './support/redis';

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
