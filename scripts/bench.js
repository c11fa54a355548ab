#!/usr/bin/env node
// Throughput and latency of SMTP Mux, measured, not asserted: prints figures, checks nothing.
//
//   npm run build && node scripts/bench.js [--messages 2000] [--concurrency 8] [--size 4096]
//
// Two sink SMTP servers (accept everything, count bytes) run in this process; SMTP Mux runs as its own
// process (`node dist/cli.js serve`) in front of them; a pooled nodemailer client sends the load over
// `--concurrency` connections. Each scenario is run against the sinks directly first (the baseline),
// then through SMTP Mux with an order-style selector (round-robin.js) and a send()-style one
// (waterfall.js). Everything binds 127.0.0.1 on ports the OS picks; every run is bounded by --messages.
// Besides throughput and latency it prints the CPU time SMTP Mux's process used per message (from
// /proc, Linux only), which other load on a shared machine disturbs far less than msg/s.
'use strict';

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { parseArgs } = require('node:util');
const { SMTPServer } = require('smtp-server');
const nodemailer = require('nodemailer');

const ROOT = path.resolve(__dirname, '..');
const { values } = parseArgs({
  options: {
    messages: { type: 'string', default: '2000' },
    concurrency: { type: 'string', default: '8' },
    size: { type: 'string', default: '4096' },
  },
});
const MESSAGES = Number(values.messages);
const CONCURRENCY = Number(values.concurrency);
const SIZE = Number(values.size);

function startSink() {
  const sink = { received: 0, bytes: 0 };
  const server = new SMTPServer({
    authOptional: true,
    disabledCommands: ['STARTTLS'],
    logger: false,
    size: 100 * 1024 * 1024,
    onData(stream, _session, callback) {
      stream.on('data', (c) => (sink.bytes += c.length));
      stream.on('end', () => {
        sink.received++;
        callback(null, 'OK');
      });
    },
  });
  return new Promise((resolve) =>
    server.listen(0, '127.0.0.1', () => resolve(Object.assign(sink, { port: server.server.address().port, close: () => server.close() }))),
  );
}

function body(size) {
  const line = 'The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopqrstuvwxyz\r\n';
  return line.repeat(Math.ceil(size / line.length)).slice(0, size);
}

async function load(port, auth) {
  const transport = nodemailer.createTransport({ host: '127.0.0.1', port, pool: true, maxConnections: CONCURRENCY, maxMessages: Infinity, ignoreTLS: true, auth });
  const raw = `From: <bench@example.com>\r\nTo: <sink@example.org>\r\nSubject: bench\r\n\r\n${body(SIZE)}`;
  const latencies = [];
  let failed = 0;
  let next = 0;
  const started = process.hrtime.bigint();
  const worker = async () => {
    while (next < MESSAGES) {
      next++;
      const t0 = process.hrtime.bigint();
      try {
        await transport.sendMail({ envelope: { from: 'bench@example.com', to: ['sink@example.org'] }, raw });
      } catch {
        failed++;
      }
      latencies.push(Number(process.hrtime.bigint() - t0) / 1e6);
    }
  };
  await Promise.all(Array.from({ length: CONCURRENCY }, worker));
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  transport.close();
  latencies.sort((a, b) => a - b);
  const pct = (p) => latencies[Math.min(latencies.length - 1, Math.floor((p / 100) * latencies.length))].toFixed(1);
  return { rate: (MESSAGES / seconds).toFixed(0), p50: pct(50), p95: pct(95), p99: pct(99), failed };
}

/** CPU seconds (user + system) a process has used so far, from /proc (Linux); undefined elsewhere. */
function cpuSeconds(pid) {
  try {
    const fields = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
    // utime and stime are fields 14 and 15 of stat(5), counted from 1 including pid and comm.
    return (Number(fields[11]) + Number(fields[12])) / 100;
  } catch {
    return undefined;
  }
}

function startProxy(dir, selector, sinks) {
  const config = path.join(dir, `${selector}.yaml`);
  fs.writeFileSync(
    config,
    `listen: { host: 127.0.0.1, port: 0 }
allow_insecure_auth: true
max_message_size: 100MB
users:
  - email: bench@user.com
    password: bench
    selector: ${selector}
    downstreams:
${sinks.map((s, i) => `      - { name: sink${i + 1}, addr: "127.0.0.1:${s.port}", tls: none }`).join('\n')}
`,
  );
  const child = spawn(process.execPath, ['--no-node-snapshot', path.join(ROOT, 'dist', 'cli.js'), 'serve', '--config', config], {
    env: { ...process.env, SMTPMUX_PORT: '0', SMTPMUX_HTTP_PORT: '0' },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  return new Promise((resolve, reject) => {
    let buffered = '';
    const timer = setTimeout(() => reject(new Error('SMTP Mux did not start within 20 s')), 20_000);
    child.stdout.on('data', (chunk) => {
      buffered += chunk;
      for (const line of buffered.split('\n')) {
        if (!line.includes('SMTP Mux listening')) continue;
        clearTimeout(timer);
        resolve({ port: JSON.parse(line).port, pid: child.pid, stop: () => new Promise((r) => (child.once('exit', r), child.kill('SIGTERM'))) });
      }
    });
    child.once('exit', (code) => reject(new Error(`SMTP Mux exited with ${code}`)));
  });
}

async function main() {
  if (!fs.existsSync(path.join(ROOT, 'dist', 'cli.js'))) throw new Error('run `npm run build` first');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'smtpmux-bench-'));
  const sinks = [await startSink(), await startSink()];
  console.log(`SMTP Mux benchmark: ${MESSAGES} messages of ${SIZE} bytes over ${CONCURRENCY} connections, Node ${process.version}, ${os.cpus().length} cores`);
  // CPU ms/msg: CPU time SMTP Mux's process used per message (user + system), less sensitive than msg/s
  // to other load on the machine; the direct baseline has no SMTP Mux process.
  console.log('scenario                              msg/s   p50 ms   p95 ms   p99 ms  failed  CPU ms/msg');
  const row = (name, r, cpu) =>
    console.log(`${name.padEnd(36)} ${r.rate.padStart(6)} ${r.p50.padStart(8)} ${r.p95.padStart(8)} ${r.p99.padStart(8)} ${String(r.failed).padStart(7)} ${(cpu === undefined ? '-' : ((cpu * 1000) / MESSAGES).toFixed(3)).padStart(11)}`);
  row('direct to a sink (baseline)', await load(sinks[0].port));
  for (const selector of ['round-robin.js', 'waterfall.js']) {
    const proxy = await startProxy(dir, selector, sinks);
    try {
      await load(proxy.port, { user: 'bench@user.com', pass: 'bench' }); // warm-up: pools, JIT
      const cpuBefore = cpuSeconds(proxy.pid);
      const result = await load(proxy.port, { user: 'bench@user.com', pass: 'bench' });
      const cpuAfter = cpuSeconds(proxy.pid);
      row(`through SMTP Mux, ${selector}`, result, cpuBefore === undefined || cpuAfter === undefined ? undefined : cpuAfter - cpuBefore);
    } finally {
      await proxy.stop();
    }
  }
  for (const sink of sinks) sink.close();
  fs.rmSync(dir, { recursive: true, force: true });
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
