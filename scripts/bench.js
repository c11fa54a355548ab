#!/usr/bin/env node
// Throughput, latency and memory of SMTP Mux, measured, not asserted: prints figures, checks nothing.
//
//   npm run bench                        (builds first; same as: npm run build && node scripts/bench.js)
//   node scripts/bench.js --scenarios c1-2k,c4-5m --seconds 4 --selector waterfall.js
//   node scripts/bench.js --scenarios c4-5m --prof /tmp/prof     (a CPU profile of the proxy per scenario)
//
// Each scenario (connections × message size) runs twice in the same run: straight to a sink ("direct",
// the ceiling of this box with this load generator) and through SMTP Mux in front of the same sink.
// Printed per row: msg/s, MB/s, p50/p99 latency (MAIL written → 250 after the final dot), the msg/s
// ratio to direct, the proxy's peak RSS (VmHWM of a fresh proxy process per scenario), and the CPU time
// the proxy and the sink spent per message (user + system, from /proc): on a loaded machine the CPU per
// message moves much less than the rates do, so compare it when the ratios are noisy.
//
// The parts: the sink is smtp-server in a child process (accepts everything, counts messages); SMTP Mux
// is `node dist/cli.js serve` in its own process; the load generator runs in this process over plain
// sockets (EHLO, AUTH PLAIN, then MAIL/RCPT/DATA in a loop per connection, no pipelining, each message
// pre-dot-stuffed and written in one go), so the client costs the same in both columns. Everything binds
// 127.0.0.1 on ports the OS picks; each measured run stops at --seconds or its message cap, whichever
// comes first, and every child process is stopped by its pid. The machine may be shared: trust the
// ratios more than the absolute figures, and repeat a run that looks noisy.
'use strict';

const { spawn, fork } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { parseArgs } = require('node:util');

const ROOT = path.resolve(__dirname, '..');

/** name → connections, message size, message cap of one measured run. */
const SCENARIOS = {
  'c1-2k': { conns: 1, size: 2 * 1024, cap: 30000 },
  'c8-2k': { conns: 8, size: 2 * 1024, cap: 60000 },
  'c32-2k': { conns: 32, size: 2 * 1024, cap: 60000 },
  'c8-100k': { conns: 8, size: 100 * 1024, cap: 10000 },
  'c4-5m': { conns: 4, size: 5 * 1024 * 1024, cap: 500 },
  // Memory, not speed (not in the default list): 50 connections send one 20 MB message each at once;
  // "RSS growth" is the proxy's peak minus its RSS just before. Warmed up with small messages.
  'c50-20m': { conns: 50, size: 20 * 1024 * 1024, cap: 50, warmupSize: 2 * 1024, optional: true },
};

const { values } = parseArgs({
  options: {
    scenarios: { type: 'string', default: Object.keys(SCENARIOS).filter((name) => !SCENARIOS[name].optional).join(',') },
    seconds: { type: 'string', default: '5' },
    warmup: { type: 'string', default: '1' },
    selector: { type: 'string', default: 'round-robin.js' },
    /** Write a V8 CPU profile of each proxy process into this folder (node --cpu-prof). */
    prof: { type: 'string' },
    /** Extra node flags for the proxy process, for experiments (e.g. "--max-semi-space-size=4"). */
    'proxy-node-args': { type: 'string', default: '' },
    'no-size': { type: 'boolean', default: false },
    sink: { type: 'boolean', default: false },
  },
});

// ---------------------------------------------------------------------------------------------------
// The sink (child process): smtp-server, accepts any AUTH, discards bodies, counts messages.

function runSink() {
  const { SMTPServer } = require('smtp-server');
  let received = 0;
  const server = new SMTPServer({
    authOptional: true,
    allowInsecureAuth: true,
    disabledCommands: ['STARTTLS'],
    logger: false,
    size: 200 * 1024 * 1024,
    onAuth: (_auth, _session, callback) => callback(null, { user: 'bench' }),
    onData(stream, _session, callback) {
      stream.resume();
      stream.on('end', () => {
        received++;
        callback(null, 'OK');
      });
    },
  });
  process.on('message', (msg) => {
    if (msg === 'count') process.send({ received });
  });
  process.on('disconnect', () => process.exit(0));
  server.listen(0, '127.0.0.1', () => process.send({ port: server.server.address().port }));
}

/** A memory figure of a process from /proc/PID/status, in MB; NaN where there is no /proc. */
function statusMb(pid, field) {
  try {
    const kb = new RegExp(`${field}:\\s+(\\d+)`).exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
    return kb ? Number(kb) / 1024 : NaN;
  } catch {
    return NaN;
  }
}

/** CPU seconds (user + system) of a process, from /proc/PID/stat; NaN where there is no /proc. */
function cpuSeconds(pid) {
  try {
    const fields = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
    return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in clock ticks (USER_HZ = 100)
  } catch {
    return NaN;
  }
}

function startSink() {
  const child = fork(__filename, ['--sink'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  return new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('message', ({ port }) =>
      resolve({
        port,
        cpuSeconds: () => cpuSeconds(child.pid),
        count: () => new Promise((r) => (child.once('message', (m) => r(m.received)), child.send('count'))),
        stop: () => new Promise((r) => (child.once('exit', r), child.kill('SIGTERM'))),
      }),
    );
  });
}

// ---------------------------------------------------------------------------------------------------
// SMTP Mux as its own process, on a port the OS picks.

function startProxy(dir, sinkPort) {
  const config = path.join(dir, 'config.yaml');
  fs.writeFileSync(
    config,
    `listen: { host: 127.0.0.1, port: 0 }
allow_insecure_auth: true
max_message_size: 100MB
# Every connection of the load comes from 127.0.0.1; the default (20 per address) would refuse some.
max_connections_per_address: 1000
users:
  - email: bench@user.com
    password: bench
    selector: ${values.selector}
    downstreams:
      - { name: sink, addr: "127.0.0.1:${sinkPort}", user: u, pass: p, tls: none }
`,
  );
  const prof = values.prof ? ['--cpu-prof', '--cpu-prof-dir', path.resolve(values.prof)] : [];
  const extra = values['proxy-node-args'].split(/\s+/).filter(Boolean);
  const child = spawn(process.execPath, ['--no-node-snapshot', ...prof, ...extra, path.join(ROOT, 'dist', 'cli.js'), 'serve', '--config', config], {
    // Port 0 for the admin HTTP listener too: the default port would collide between runs.
    env: { ...process.env, SMTPMUX_PORT: '0', SMTPMUX_HTTP_PORT: '0', TMPDIR: dir },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  return new Promise((resolve, reject) => {
    let buffered = '';
    let started = false;
    const timer = setTimeout(() => reject(new Error('SMTP Mux did not start within 20 s')), 20_000);
    child.stdout.on('data', (chunk) => {
      if (started) return; // the log lines are read (so the pipe never fills) and dropped
      buffered += chunk;
      const line = buffered.split('\n').find((l) => l.includes('SMTP Mux listening'));
      if (!line) return;
      started = true;
      clearTimeout(timer);
      resolve({
        port: JSON.parse(line).port,
        /** Peak resident set size of the proxy process so far, in MB (Linux: VmHWM). */
        peakRssMb: () => statusMb(child.pid, 'VmHWM'),
        /** Resident set size now, in MB. */
        rssMb: () => statusMb(child.pid, 'VmRSS'),
        /** CPU seconds (user + system) the proxy process used so far (Linux: /proc/PID/stat). */
        cpuSeconds: () => cpuSeconds(child.pid),
        stop: () => new Promise((r) => (child.exitCode !== null ? r() : (child.once('exit', r), child.kill('SIGTERM')))),
      });
    });
    child.once('exit', (code) => !started && reject(new Error(`SMTP Mux exited with ${code}`)));
  });
}

// ---------------------------------------------------------------------------------------------------
// The load generator: one raw SMTP client per connection.

/** A message of exactly `size` bytes on the wire before the final dot, as 78-column CRLF lines. */
function message(size) {
  const head = 'From: <bench@example.com>\r\nTo: <sink@example.org>\r\nSubject: bench\r\n\r\n';
  const line = 'The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopqrstuvwx\r\n';
  const bodyLength = size - head.length;
  const text = head + line.repeat(Math.ceil(bodyLength / line.length)).slice(0, bodyLength - 2) + '\r\n';
  return Buffer.concat([Buffer.from(text), Buffer.from('.\r\n')]); // no line starts with a dot: nothing to stuff
}

class Client {
  constructor(socket) {
    this.socket = socket;
    this.buffer = '';
    this.waiting = [];
    socket.setNoDelay(true);
    socket.on('data', (chunk) => {
      this.buffer += chunk.toString('latin1');
      let end;
      // A reply is complete at a line whose fourth character is a space ("250 ok"), not "250-".
      while ((end = this.buffer.indexOf('\r\n')) >= 0) {
        const line = this.buffer.slice(0, end);
        this.buffer = this.buffer.slice(end + 2);
        if (line[3] !== '-') this.waiting.shift()?.resolve(line);
      }
    });
    const fail = (err) => {
      for (const w of this.waiting.splice(0)) w.reject(err ?? new Error('connection closed'));
    };
    socket.on('error', fail);
    socket.on('close', () => fail());
  }

  static connect(port) {
    return new Promise((resolve, reject) => {
      const socket = net.connect(port, '127.0.0.1');
      const client = new Client(socket);
      socket.once('error', reject);
      client.reply().then(() => resolve(client), reject); // the banner
    });
  }

  reply() {
    return new Promise((resolve, reject) => this.waiting.push({ resolve, reject }));
  }

  async command(data, expect) {
    const pending = this.reply();
    this.socket.write(data);
    const line = await pending;
    if (!line.startsWith(expect)) throw new Error(`expected ${expect}, got: ${line}`);
    return line;
  }

  close() {
    this.socket.end('QUIT\r\n');
    this.socket.destroy();
  }
}

function percentile(sorted, p) {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] : NaN;
}

/** Sends `wire` over `conns` connections until `cap` messages or `seconds` have passed. */
async function load(port, { conns, cap, seconds, wire, auth }) {
  const latencies = [];
  let started = 0;
  let failed = 0;
  const deadline = Date.now() + seconds * 1000;
  // SIZE= as most clients send it where the server offers SIZE (nodemailer, Postfix); --no-size leaves it off.
  const mailFrom = values['no-size'] ? 'MAIL FROM:<bench@example.com>\r\n' : `MAIL FROM:<bench@example.com> SIZE=${wire.length - 3}\r\n`;
  const t0 = process.hrtime.bigint();
  const worker = async () => {
    const client = await Client.connect(port);
    try {
      await client.command('EHLO bench.example\r\n', '250');
      if (auth) await client.command(`AUTH PLAIN ${Buffer.from(`\0${auth.user}\0${auth.pass}`).toString('base64')}\r\n`, '235');
      while (started < cap && Date.now() < deadline) {
        started++;
        const t = process.hrtime.bigint();
        try {
          await client.command(mailFrom, '250');
          await client.command('RCPT TO:<sink@example.org>\r\n', '250');
          await client.command('DATA\r\n', '354');
          await client.command(wire, '250');
          latencies.push(Number(process.hrtime.bigint() - t) / 1e6);
        } catch (err) {
          failed++;
          if (client.socket.destroyed) throw err;
          await client.command('RSET\r\n', '250');
        }
      }
    } finally {
      client.close();
    }
  };
  const results = await Promise.allSettled(Array.from({ length: conns }, worker));
  const wall = Number(process.hrtime.bigint() - t0) / 1e9;
  const errors = results.filter((r) => r.status === "rejected");
  failed += errors.length;
  if (errors.length) console.error(`  ${errors.length} connection(s) failed: ${errors[0].reason?.message ?? errors[0].reason}`);
  latencies.sort((a, b) => a - b);
  const ok = latencies.length;
  return { ok, failed, wall, rate: ok / wall, mbps: (ok * (wire.length - 3)) / wall / 1e6, p50: percentile(latencies, 50), p99: percentile(latencies, 99) };
}

/** A load run with the CPU the sink (and the proxy) spent on it, per accepted message, in ms. */
async function measured(run, sink, proxy) {
  const sink0 = sink.cpuSeconds();
  const proxy0 = proxy ? proxy.cpuSeconds() : NaN;
  const r = await run();
  const perMessage = (s) => (s * 1000) / Math.max(1, r.ok);
  return { ...r, sinkCpu: perMessage(sink.cpuSeconds() - sink0), proxyCpu: proxy ? perMessage(proxy.cpuSeconds() - proxy0) : NaN };
}

// ---------------------------------------------------------------------------------------------------

async function main() {
  if (values.sink) return runSink();
  if (!fs.existsSync(path.join(ROOT, 'dist', 'cli.js'))) throw new Error('run `npm run build` first');
  const names = values.scenarios.split(',').filter(Boolean);
  for (const name of names) if (!SCENARIOS[name]) throw new Error(`unknown scenario ${name}; known: ${Object.keys(SCENARIOS).join(', ')}`);
  const seconds = Number(values.seconds);
  const warmup = Number(values.warmup);
  const auth = { user: 'bench@user.com', pass: 'bench' };
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'smtpmux-bench-'));

  console.log(`SMTP Mux benchmark: Node ${process.version}, ${os.cpus().length} cores, load ${os.loadavg()[0].toFixed(2)}, selector ${values.selector}, ≤ ${seconds} s per run`);
  console.log('scenario  system        msgs  fail    msg/s     MB/s   p50 ms   p99 ms  × direct  peak RSS MB  CPU ms/msg proxy  sink');
  const row = (name, system, r, direct, rss) =>
    console.log(
      [
        name.padEnd(9),
        system.padEnd(12),
        String(r.ok).padStart(5),
        String(r.failed).padStart(5),
        r.rate.toFixed(0).padStart(8),
        r.mbps.toFixed(1).padStart(8),
        r.p50.toFixed(2).padStart(8),
        r.p99.toFixed(2).padStart(8),
        (direct ? `${(r.rate / direct.rate).toFixed(2)}×` : '').padStart(9),
        (rss === undefined ? '' : rss.toFixed(0)).padStart(12),
        (Number.isNaN(r.proxyCpu) ? '' : r.proxyCpu.toFixed(2)).padStart(17),
        r.sinkCpu.toFixed(2).padStart(5),
      ].join(' '),
    );

  const summary = [];
  try {
    for (const name of names) {
      const { conns, size, cap, warmupSize } = SCENARIOS[name];
      const wire = message(size);
      const warmupWire = warmupSize ? message(warmupSize) : wire;
      const sink = await startSink();
      let proxy;
      try {
        await load(sink.port, { conns, cap, seconds: warmup, wire: warmupWire });
        const direct = await measured(() => load(sink.port, { conns, cap, seconds, wire }), sink);
        row(name, 'direct', direct);
        proxy = await startProxy(dir, sink.port);
        await load(proxy.port, { conns, cap, seconds: warmup, wire: warmupWire, auth }); // JIT, pools, isolate
        const rssBefore = proxy.rssMb();
        const through = await measured(() => load(proxy.port, { conns, cap, seconds, wire, auth }), sink, proxy);
        const rss = proxy.peakRssMb();
        row(name, 'SMTP Mux', through, direct, rss);
        summary.push({ name, ratio: through.rate / direct.rate, addedP50: through.p50 - direct.p50, rss, growth: rss - rssBefore, cpu: through.proxyCpu });
      } finally {
        await proxy?.stop();
        await sink.stop();
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  console.log('\nratio to direct (msg/s), p50 added by the proxy, peak RSS (growth during the measured run), proxy CPU per message:');
  for (const s of summary) {
    console.log(`  ${s.name.padEnd(8)} ${s.ratio.toFixed(2)}×   +${s.addedP50.toFixed(2)} ms p50   ${s.rss.toFixed(0)} MB (+${s.growth.toFixed(0)} MB)   ${s.cpu.toFixed(2)} ms CPU`);
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
