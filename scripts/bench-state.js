#!/usr/bin/env node
// What shared state costs per message, and what a shared queue on Redis would cost: measured, not
// asserted; prints figures, checks nothing.
//
//   npm run build && node scripts/bench-state.js [--messages 2000] [--concurrency 8] [--body 51200]
//
// Starts its own redis-server (Debian package) on a free loopback port, nothing saved to disk.
//  1. The state operations one message with a rate, a quota and a health check costs (health, acquireRate,
//     reserveQuota, recordSuccess, plus a ctx.state incr for a round-robin selector), one message after
//     another and with --concurrency messages at once, on the memory store and on Redis.
//  2. The fallback: how long the first call waits when Redis hangs (SIGSTOP), and the calls after it.
//  3. For the spool decision: writing a message body durably (a) to a local file with fsync, and (b) into
//     Redis with appendfsync always (what a shared queue such as BullMQ would need for a 250 to mean
//     "stored"), and Redis's memory growth per queued body.
'use strict';

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { parseArgs } = require('node:util');

const ROOT = path.resolve(__dirname, '..');
const { MemoryStateStore } = require(path.join(ROOT, 'dist/state/memory'));
const { RedisStateStore } = require(path.join(ROOT, 'dist/state/redis'));
const { FallbackStateStore } = require(path.join(ROOT, 'dist/state/fallback'));
const { createLogger } = require(path.join(ROOT, 'dist/observe/logger'));

const { values } = parseArgs({
  options: {
    messages: { type: 'string', default: '2000' },
    concurrency: { type: 'string', default: '8' },
    body: { type: 'string', default: '51200' },
  },
});
const MESSAGES = Number(values.messages);
const CONCURRENCY = Number(values.concurrency);
const BODY = Number(values.body);

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

async function startRedis(extra = []) {
  const port = await freePort();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'smtpmux-bench-redis-'));
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--dir', dir, '--loglevel', 'warning', ...extra], { stdio: 'ignore' });
  const url = `redis://127.0.0.1:${port}`;
  const probe = RedisStateStore.create({ url, prefix: 'bench:', timeoutMs: 2000 });
  if (!(await probe.ready(10_000))) throw new Error('redis-server did not start');
  await probe.close();
  return {
    url,
    child,
    async stop() {
      child.kill('SIGCONT');
      child.kill('SIGKILL');
      await new Promise((r) => child.once('exit', r));
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

const percentile = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.floor((sorted.length * p) / 100))];
const fmt = (ms) => `${ms.toFixed(3)} ms`;

/** The state operations of one message: health, a rate slot, a quota reservation, the success, a rotation. */
async function oneMessage(store, i) {
  const ds = `ds:bench${i % 2}`;
  await store.health(ds);
  await store.acquireRate(ds, 1_000_000, 1000, 1000, 1);
  await store.reserveQuota(ds, `m${i}`, 1, 1_000_000_000, 86_400_000);
  await store.recordSuccess(ds);
  await store.incr('sel:bench:rr', 1);
}

async function measure(label, store) {
  // Warm-up (scripts loaded, JIT).
  for (let i = 0; i < 200; i++) await oneMessage(store, -i - 1);
  const times = [];
  let started = process.hrtime.bigint();
  for (let i = 0; i < MESSAGES; i++) {
    const t = process.hrtime.bigint();
    await oneMessage(store, i);
    times.push(Number(process.hrtime.bigint() - t) / 1e6);
  }
  const serialMs = Number(process.hrtime.bigint() - started) / 1e6;
  times.sort((a, b) => a - b);
  let next = MESSAGES;
  started = process.hrtime.bigint();
  await Promise.all(
    Array.from({ length: CONCURRENCY }, async () => {
      while (next < 2 * MESSAGES) await oneMessage(store, next++);
    }),
  );
  const concurrentMs = Number(process.hrtime.bigint() - started) / 1e6;
  console.log(
    `${label.padEnd(30)} per message (5 ops): p50 ${fmt(percentile(times, 50))}, p99 ${fmt(percentile(times, 99))}; ` +
      `${Math.round((MESSAGES / serialMs) * 1000)} msg/s one at a time, ${Math.round((MESSAGES / concurrentMs) * 1000)} msg/s with ${CONCURRENCY} at once`,
  );
}

async function fallbackFigures(redis) {
  const logger = createLogger({ level: 'silent' });
  const store = new FallbackStateStore(RedisStateStore.create({ url: redis.url, prefix: 'bench:', timeoutMs: 500 }), logger, { minProbeMs: 200 });
  await store.start(2000);
  redis.child.kill('SIGSTOP');
  let t = process.hrtime.bigint();
  await oneMessage(store, 0);
  const first = Number(process.hrtime.bigint() - t) / 1e6;
  t = process.hrtime.bigint();
  for (let i = 1; i <= 1000; i++) await oneMessage(store, i);
  const after = Number(process.hrtime.bigint() - t) / 1e6 / 1000;
  redis.child.kill('SIGCONT');
  const resumed = Date.now();
  while (store.status().degraded && Date.now() - resumed < 20_000) await new Promise((r) => setTimeout(r, 10));
  console.log(
    `fallback (timeout_ms 500, Redis SIGSTOPped): first message ${fmt(first)} (one deadline), then ${fmt(after)} per message locally; ` +
      `shared again ${Date.now() - resumed} ms after Redis resumed (probe backoff); ${store.status().localOperations} operations served locally`,
  );
  await store.close();
}

async function spoolFigures() {
  const body = Buffer.alloc(BODY, 'x');
  const count = Math.min(MESSAGES, 500);
  // (a) local file, fsync, rename: what a per-instance spool pays per message (node:sqlite is similar).
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'smtpmux-bench-spool-'));
  let t = process.hrtime.bigint();
  for (let i = 0; i < count; i++) {
    const tmp = path.join(dir, `${i}.tmp`);
    const fd = fs.openSync(tmp, 'w');
    fs.writeSync(fd, body);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fs.renameSync(tmp, path.join(dir, `${i}.eml`));
  }
  const local = Number(process.hrtime.bigint() - t) / 1e6 / count;
  fs.rmSync(dir, { recursive: true, force: true });

  // (b) Redis with appendfsync always: the body and a queue entry in one MULTI, fsynced before the reply.
  const redis = await startRedis(['--appendonly', 'yes', '--appendfsync', 'always']);
  const { createClient } = require('redis');
  const client = createClient({ url: redis.url });
  await client.connect();
  const before = Number(/used_memory:(\d+)/.exec(await client.info('memory'))[1]);
  t = process.hrtime.bigint();
  for (let i = 0; i < count; i++) await client.multi().set(`bench:body:${i}`, body).lPush('bench:queue', String(i)).exec();
  const shared = Number(process.hrtime.bigint() - t) / 1e6 / count;
  const after = Number(/used_memory:(\d+)/.exec(await client.info('memory'))[1]);
  await client.close();
  await redis.stop();
  console.log(`spool, ${BODY} B body, durable before the reply: local file+fsync+rename ${fmt(local)}; Redis appendfsync always ${fmt(shared)}`);
  console.log(`spool in Redis costs its RAM: ${Math.round((after - before) / count)} B per queued body of ${BODY} B (a 25 MB message is 25 MB of Redis memory while queued)`);
}

async function main() {
  console.log(`node ${process.version}, ${os.cpus().length} CPU(s), ${MESSAGES} messages, concurrency ${CONCURRENCY}`);
  await measure('memory', new MemoryStateStore());
  const redis = await startRedis();
  const store = RedisStateStore.create({ url: redis.url, prefix: 'bench:', timeoutMs: 2000 });
  await store.ready(5000);
  await measure('redis (loopback)', store);
  await store.close();
  await fallbackFigures(redis);
  await redis.stop();
  await spoolFigures();
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(err);
    process.exit(1);
  },
);
