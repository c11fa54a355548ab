#!/usr/bin/env node
// The command line: `smtpmux serve | check | try | health | hash-password | tls`. isolated-vm needs --no-node-snapshot, so
// when it is missing the CLI replaces itself with a node that has it, before loading anything else (and,
// for serve, with a smaller V8 young generation and a tighter old generation: see ensureNodeFlags).
import { parseArgs } from 'node:util';

/**
 * V8's young generation for `serve`, in MB per semi-space, unless the command line or NODE_OPTIONS sets
 * --max-semi-space-size. Node's default lets the young generation grow far larger, in the main isolate
 * and in each selector isolate; at 8 connections of 2 KB messages that was most of the proxy's peak RSS
 * growth (peak 250-300 MB; 150-200 MB with 8). It also bounds how many dead socket and file buffers wait
 * for a scavenge: 50 concurrent 20 MB messages grew RSS by 108-113 MB with 8, 78-87 MB with 4, 67-69 MB
 * with 2. With the Mailer layer gone from the send path (fewer objects per message), 4 costs no CPU per
 * message measurable here at 1/8/32 x 2 KB, 8 x 100 KB or 4 x 5 MB (an earlier send path paid for it at
 * 5 MB); 2 cost 5-9% at 32 x 2 KB and 8 x 100 KB (npm run bench, alternating runs).
 */
const SERVE_SEMI_SPACE_MB = 4;

/**
 * How far V8 lets the old generation grow past what the last full GC kept before the next one, in percent,
 * for `serve`, unless --heap-growing-percent is given. Left to itself V8 allows up to 300% on a machine with
 * memory to spare: with ~20 MB live after a full GC, the old generation filled up to ~70 MB with
 * per-message objects that had outlived two scavenges, most of the peak RSS growth at 8 connections of
 * 2 KB (peak 172-185 MB in npm run bench; 141-149 MB with 150). The price is more full GCs, whose marking
 * runs mostly on V8's helper threads: their share of the proxy's CPU went from 22% to 26% at 8 x 100 KB
 * (to 29% with 100, which saved ~10 MB more) and stayed at 16-17% at 8 x 2 KB.
 */
const SERVE_HEAP_GROWING_PERCENT = 150;

function ensureNodeFlags(): void {
  const given = [...process.execArgv, ...(process.env.NODE_OPTIONS ?? '').split(/\s+/)].map((arg) => arg.replace(/_/g, '-'));
  const has = (name: string): boolean => given.some((arg) => arg === name || arg.startsWith(`${name}=`));
  const command = process.argv[2];
  const serving = command === undefined || command === 'serve' || command.startsWith('-');
  const missing: string[] = [];
  if (!has('--no-node-snapshot')) missing.push('--no-node-snapshot');
  if (serving && !has('--max-semi-space-size')) missing.push(`--max-semi-space-size=${SERVE_SEMI_SPACE_MB}`);
  if (serving && !has('--heap-growing-percent')) missing.push(`--heap-growing-percent=${SERVE_HEAP_GROWING_PERCENT}`);
  if (missing.length === 0) return;
  const args = [process.execPath, ...missing, ...process.execArgv, __filename, ...process.argv.slice(2)];
  if (typeof process.execve === 'function') process.execve(process.execPath, args, process.env);
  // Node without execve (before 22.15): run a child and mirror its fate.
  const { spawnSync } = require('node:child_process') as typeof import('node:child_process');
  const child = spawnSync(args[0], args.slice(1), { stdio: 'inherit' });
  process.exit(child.status ?? 1);
}

const USAGE = `Usage: smtpmux <command> [options]

Commands:
  serve     run the proxy (default)
  check     validate the config and compile every selector
  try       dry-run a user's selector with a made-up message (nothing is delivered)
  health    exit 0 when the proxy is ready: GET /readyz on its admin port (for container health checks)
  hash-password          read a password from stdin (no echo on a terminal), print its argon2id hash
  tls selfsigned DIR     write a self-signed certificate and key for a test setup into DIR
  queue     list, show, retry or drop spooled messages (also while serve runs)

Options:
  -c, --config PATH   config file (default: $SMTPMUX_CONFIG or config/config.yaml)
  -h, --help          show this help
Run "smtpmux try --help" for the options of try, "smtpmux queue --help" for queue.`;

async function main(): Promise<number> {
  const argv = process.argv.slice(2);
  const command = argv[0] && !argv[0].startsWith('-') ? argv.shift()! : 'serve';
  if (argv.includes('-h') || argv.includes('--help') || command === 'help') {
    if (command === 'try') {
      const { TRY_USAGE } = await import('./try');
      console.log(TRY_USAGE);
    } else if (command === 'tls') {
      const { TLS_USAGE } = await import('./cli/tls');
      console.log(TLS_USAGE);
    } else if (command === 'queue') {
      const { QUEUE_USAGE } = await import('./cli/queue');
      console.log(QUEUE_USAGE);
    } else console.log(USAGE);
    return 0;
  }
  const configPath = (): string => {
    const { values } = parseArgs({ args: argv, options: { config: { type: 'string', short: 'c' } }, strict: false });
    return (values.config as string | undefined) ?? process.env.SMTPMUX_CONFIG ?? 'config/config.yaml';
  };
  switch (command) {
    case 'serve':
      return serve(configPath());
    case 'check':
      return check(configPath());
    case 'health':
      return health(configPath());
    case 'hash-password': {
      const { runHashPassword } = await import('./cli/hash-password');
      return runHashPassword();
    }
    case 'tls': {
      const { runTls } = await import('./cli/tls');
      return runTls(argv);
    }
    case 'try': {
      const { runTry } = await import('./try');
      return runTry(argv);
    }
    case 'queue': {
      const { runQueue } = await import('./cli/queue');
      return runQueue(argv);
    }
    default:
      console.error(`smtpmux: unknown command "${command}"\n\n${USAGE}`);
      return 2;
  }
}

/** Prints a start-up failure the way a person wants to read it: each problem on its own line. */
function reportFailure(err: unknown): number {
  const { describeLoadFailure } = require('./runtime') as typeof import('./runtime');
  const loadFailure = describeLoadFailure(err);
  if (loadFailure) console.error(`smtpmux: ${loadFailure}`);
  else if ((err as NodeJS.ErrnoException)?.code === 'EADDRINUSE') {
    const which = (err as { listener?: string }).listener === 'http' ? 'admin HTTP port' : 'SMTP port';
    console.error(`smtpmux: the ${which} is already in use (${(err as Error).message})`);
  }
  else console.error(`smtpmux: ${(err as Error)?.stack ?? err}`);
  return 1;
}

async function serve(config: string): Promise<number> {
  const { App } = await import('./app');
  let app: Awaited<ReturnType<typeof App.start>> | undefined;
  let finish!: (code: number) => void;
  const finished = new Promise<number>((resolve) => (finish = resolve));
  // Signals are handled from the first moment: one that arrives while the app is still starting is
  // acted on as soon as it is up (a SIGHUP's default action would otherwise kill the process).
  let stopSignal: string | undefined;
  let reloadPending = false;
  const stop = (signal: string): void => {
    if (stopSignal) {
      console.error(`smtpmux: ${signal} again: exiting now`);
      process.exit(1);
    }
    stopSignal = signal;
    if (!app) return;
    app.logger.info({ signal }, 'signal received');
    app.close().then(() => finish(0), () => finish(1));
  };
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGHUP', () => {
    if (app) void app.reload('SIGHUP');
    else reloadPending = true;
  });

  try {
    // The App watches the config and its selectors for changes itself (hot reload).
    app = await App.start({ configPath: config });
  } catch (err) {
    return reportFailure(err);
  }
  if (stopSignal) {
    const signal = stopSignal;
    stopSignal = undefined;
    stop(signal);
  } else if (reloadPending) void app.reload('SIGHUP');
  return finished;
}

async function check(config: string): Promise<number> {
  const { loadConfig } = await import('./config/load');
  const { Runtime } = await import('./runtime');
  try {
    const loaded = await loadConfig(config);
    const { runtime } = await Runtime.build(loaded);
    runtime.retire();
    const { insecureListenerWarning, plaintextPasswordWarning } = await import('./config/load');
    for (const warning of [...loaded.warnings, plaintextPasswordWarning(loaded), insecureListenerWarning(loaded)]) if (warning) console.log(`warning: ${warning}`);
    const downstreams = loaded.users.reduce((n, u) => n + u.downstreams.length, 0);
    console.log(`${loaded.file}: OK (${loaded.users.length} user(s), ${downstreams} downstream(s), ${runtime.sandboxes.size} selector(s) compiled)`);
    return 0;
  } catch (err) {
    return reportFailure(err);
  }
}

/** Where a probe on this machine reaches a listener bound to `host`. */
function probeHost(host: string): string {
  return ['0.0.0.0', '::', '127.0.0.1', 'localhost'].includes(host) ? '127.0.0.1' : host;
}

/** Whether the server waits for a PROXY header from a probe that connects to `host` from that same address. */
function expectsProxyHeader(proxyProtocol: boolean | readonly string[], host: string): boolean {
  return typeof proxyProtocol === 'boolean' ? proxyProtocol : proxyProtocol.includes(host);
}

/**
 * Exit 0 when the proxy is ready: GET /readyz on its admin listener (200), or, with `http: false`,
 * a 220 greeting on its SMTP port. SMTPMUX_HTTP_PORT (or SMTPMUX_PORT without the admin listener)
 * spares reading the config.
 */
async function health(config: string): Promise<number> {
  const envHttpPort = Number(process.env.SMTPMUX_HTTP_PORT || 0);
  let target: { kind: 'http' | 'smtp'; host: string; port: number; proxyProtocol?: boolean } | undefined;
  if (envHttpPort) target = { kind: 'http', host: probeHost(process.env.SMTPMUX_HTTP_HOST || '127.0.0.1'), port: envHttpPort };
  else {
    const { loadConfig } = await import('./config/load');
    try {
      const loaded = await loadConfig(config);
      target = loaded.http
        ? { kind: 'http', host: probeHost(loaded.http.host), port: loaded.http.port }
        : { kind: 'smtp', host: probeHost(loaded.listen.host), port: loaded.listen.port, proxyProtocol: expectsProxyHeader(loaded.proxyProtocol, probeHost(loaded.listen.host)) };
    } catch (err) {
      // Without a readable config, SMTPMUX_PORT alone still allows the SMTP check.
      const port = Number(process.env.SMTPMUX_PORT || 0);
      if (!port) return reportFailure(err);
      target = { kind: 'smtp', host: '127.0.0.1', port };
    }
  }
  const { host, port } = target;
  const shown = `${host.includes(':') ? `[${host}]` : host}:${port}`;
  const fail = (why: string): number => {
    console.error(`smtpmux health: ${why}`);
    return 1;
  };
  if (target.kind === 'http') {
    try {
      const res = await fetch(`http://${shown}/readyz`, { signal: AbortSignal.timeout(5000) });
      const text = (await res.text()).trim();
      return res.status === 200 ? 0 : fail(`${shown}/readyz answered ${res.status}: ${text.slice(0, 500)}`);
    } catch (err) {
      return fail(`${shown}/readyz: ${(err as Error & { cause?: Error }).cause?.message ?? (err as Error).message}`);
    }
  }
  const net = await import('node:net');
  return new Promise<number>((resolve) => {
    const socket = net.connect({ host, port });
    const done = (code: number, why: string): void => {
      socket.destroy();
      resolve(code === 0 ? 0 : fail(why));
    };
    // Behind a load balancer (proxy_protocol) the server waits for a PROXY header before its greeting.
    if (target.proxyProtocol) socket.once('connect', () => socket.write(`PROXY TCP4 127.0.0.1 127.0.0.1 0 ${port}\r\n`));
    socket.setTimeout(5000, () => done(1, `no greeting from ${shown} within 5 s`));
    socket.once('error', (err) => done(1, `${shown}: ${err.message}`));
    socket.once('data', (chunk) => {
      if (chunk.toString('latin1').startsWith('220')) {
        socket.end('QUIT\r\n');
        done(0, '');
      } else done(1, `unexpected greeting: ${chunk.toString('latin1').trim()}`);
    });
  });
}

ensureNodeFlags();
main().then(
  (code) => {
    process.exitCode = code;
    // Pools and timers are closed by now; exit so a stray handle cannot keep the process alive.
    setTimeout(() => process.exit(code), 200).unref();
  },
  (err) => {
    console.error(err);
    process.exit(1);
  },
);
