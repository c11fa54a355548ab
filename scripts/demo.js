#!/usr/bin/env node
// `npm run demo`: SMTP Mux in front of two local catch-all inboxes, to see routing work in a minute.
// It starts two MailDev servers in this process (SMTP + web UI on 127.0.0.1), runs the built CLI
// (`node --no-node-snapshot dist/cli.js serve`) as a child with the demo config, prints where
// everything is, and stops it all on Ctrl+C. If SMTP Mux exits, the demo exits with its code.
//
// Environment:
//   SMTPMUX_PORT               SMTP Mux's port (default 2525, or a free one if 2525 is taken; 0 = any)
//   SMTPMUX_HTTP_PORT          its admin HTTP port: status page, /metrics (default 9587, or a free one
//                              if 9587 is taken; 0 = any)
//   SMTPMUX_DEMO_DIR           copy config.yaml and selector.js there (unless already present) and use
//                              those copies instead of config/demo/ in the repo
//   DEMO_INBOX1_PORT, DEMO_INBOX1_WEB_PORT, DEMO_INBOX2_PORT, DEMO_INBOX2_WEB_PORT
//                              inbox ports (defaults 1025/1080 and 1026/1081, or free ones if taken;
//                              0 = let the OS choose)
//   SMTPMUX_DEMO_LOG           "pretty" or "json": how SMTP Mux's log lines are shown (default: pretty
//                              on a terminal, the raw JSON lines otherwise)
//
// When stdout is not a terminal, the banner is followed by one line for programs that drive the demo:
//   demo ready {"smtp":{"host","port"},"http":{"port","url"},"inboxes":[{"name","smtpPort","webPort","webUrl"}],"config","selector"}
'use strict';

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');

const ROOT = path.resolve(__dirname, '..');
const CLI = path.join(ROOT, 'dist', 'cli.js');
const BUNDLED_DEMO_DIR = path.join(ROOT, 'config', 'demo');
const DEMO_FILES = ['config.yaml', 'selector.js'];
const LOGIN = { user: 'test@user.com', pass: 'password123' };
const INBOXES = [
  { name: 'inbox1', smtpEnv: 'DEMO_INBOX1_PORT', webEnv: 'DEMO_INBOX1_WEB_PORT', smtp: 1025, web: 1080 },
  { name: 'inbox2', smtpEnv: 'DEMO_INBOX2_PORT', webEnv: 'DEMO_INBOX2_WEB_PORT', smtp: 1026, web: 1081 },
];
const LISTEN_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 15_000;

class DemoError extends Error {}

function say(line = '') {
  process.stdout.write(`${line}\n`);
}

function warn(line) {
  process.stderr.write(`demo: ${line}\n`);
}

/** A port number from the environment: undefined when unset, an error when not a port. */
function envPort(name) {
  const text = process.env[name];
  if (text === undefined || text === '') return undefined;
  const port = Number(text);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new DemoError(`${name}=${text} is not a port number`);
  return port;
}

/** True when nothing listens on host:port (checked by binding it for a moment). */
function isFree(port, host = '127.0.0.1') {
  return new Promise((resolve) => {
    const probe = net.createServer();
    probe.once('error', () => resolve(false));
    probe.listen({ port, host, exclusive: true }, () => probe.close(() => resolve(true)));
  });
}

/** A port the OS considers free right now. */
function freePort(host = '127.0.0.1') {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.once('error', reject);
    probe.listen({ port: 0, host, exclusive: true }, () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

/**
 * The port to use: an explicit one from the environment as is (0 = any), else the preferred one when
 * free, else 0 so the server binds whatever the OS gives it.
 */
async function pickPort(envName, preferred) {
  const given = envPort(envName);
  if (given !== undefined) return { port: given, explicit: true };
  return { port: (await isFree(preferred)) ? preferred : 0, explicit: false };
}

/** The folder holding the demo's config and selector: the repo's, or copies in SMTPMUX_DEMO_DIR. */
function prepareDemoDir() {
  const wanted = process.env.SMTPMUX_DEMO_DIR;
  if (!wanted) return { dir: BUNDLED_DEMO_DIR, copied: [], kept: [] };
  const dir = path.resolve(wanted);
  fs.mkdirSync(dir, { recursive: true });
  const copied = [];
  const kept = [];
  for (const file of DEMO_FILES) {
    const target = path.join(dir, file);
    if (fs.existsSync(target)) {
      kept.push(file); // never overwrite what the user (or a test) put there
    } else {
      fs.copyFileSync(path.join(BUNDLED_DEMO_DIR, file), target);
      copied.push(file);
    }
  }
  return { dir, copied, kept };
}

/** MailDev 3 is an ES module; load it once. */
let mailDevModule;
async function loadMailDev() {
  if (!mailDevModule) {
    try {
      mailDevModule = await import('maildev');
    } catch (err) {
      throw new DemoError(`cannot load MailDev (${err.message}); run \`npm install\` first`);
    }
  }
  return mailDevModule;
}

/** Best-effort teardown of a MailDev whose start() failed half-way (its stop() only runs once started). */
async function teardownPartial(maildev) {
  const orchestrator = maildev && maildev.orchestrator;
  if (!orchestrator) return;
  for (const part of [orchestrator.api, orchestrator.smtp]) {
    if (part) await part.stop().catch(() => {});
  }
  if (orchestrator.storage) await orchestrator.storage.close().catch(() => {});
}

/** Starts one MailDev inbox on 127.0.0.1; falls back to OS-chosen ports when a default one is taken. */
async function startInbox(spec) {
  const { MailDev } = await loadMailDev();
  const smtp = await pickPort(spec.smtpEnv, spec.smtp);
  const web = await pickPort(spec.webEnv, spec.web);
  const attempt = async (smtpPort, webPort) => {
    const maildev = new MailDev({
      smtp: smtpPort,
      web: webPort,
      ip: '127.0.0.1',
      webIp: '127.0.0.1',
      silent: true,
      maxEmails: 1000,
    });
    // MailDev's web server announces itself with console.info even when silent; the banner says it better.
    const info = console.info;
    console.info = () => {};
    try {
      const servers = await maildev.start();
      return { maildev, servers };
    } catch (err) {
      await teardownPartial(maildev);
      throw err;
    } finally {
      console.info = info;
    }
  };
  let started;
  try {
    started = await attempt(smtp.port, web.port);
  } catch (err) {
    // Lost a race for a default port: take any free one instead. Explicit ports are the user's call.
    if (err.code !== 'EADDRINUSE' || (smtp.explicit && web.explicit)) {
      throw new DemoError(`${spec.name}: MailDev could not start on ports ${smtp.port}/${web.port}: ${err.message}`);
    }
    started = await attempt(smtp.explicit ? smtp.port : 0, web.explicit ? web.port : 0);
  }
  const { maildev, servers } = started;
  const inbox = {
    name: spec.name,
    maildev,
    smtpPort: servers.smtp.getAddress().port,
    webPort: servers.api.getAddress().port,
  };
  inbox.webUrl = `http://localhost:${inbox.webPort}`;
  servers.smtp.on('new', (email) => {
    const to = (email.to || []).map((a) => a.address).join(', ') || '?';
    say(`[${inbox.name}] received "${email.subject || '(no subject)'}" for ${to}  ->  ${inbox.webUrl}`);
  });
  return inbox;
}

async function stopInbox(inbox) {
  let timer;
  const deadline = new Promise((resolve) => {
    timer = setTimeout(resolve, 5000);
  });
  await Promise.race([inbox.maildev.stop().catch(() => {}), deadline]);
  clearTimeout(timer);
}

const LEVELS = { 10: 'TRACE', 20: 'DEBUG', 30: 'INFO', 40: 'WARN', 50: 'ERROR', 60: 'FATAL' };
const HIDDEN_FIELDS = new Set(['level', 'time', 'msg', 'pid', 'hostname', 'name', 'v']);

/** One pino JSON line as "12:00:01 INFO  message key=value ...". */
function prettyLine(record) {
  const when = record.time === undefined ? undefined : new Date(record.time);
  const time = when && !Number.isNaN(when.getTime()) ? when.toTimeString().slice(0, 8) : '';
  const level = (LEVELS[record.level] || String(record.level || '')).padEnd(5);
  const fields = Object.entries(record)
    .filter(([key]) => !HIDDEN_FIELDS.has(key))
    .map(([key, value]) => `${key}=${JSON.stringify(value)}`);
  return [time, level, record.msg ?? '', ...fields].filter(Boolean).join(' ');
}

function banner({ smtpHost, smtpPort, statusUrl, inboxes, configFile, selectorFile, notes }) {
  const host = smtpHost === '127.0.0.1' || smtpHost === '0.0.0.0' || smtpHost === '::' || smtpHost === '::1' ? 'localhost' : smtpHost;
  const server = `${host}:${smtpPort}`;
  const rule = '-'.repeat(78);
  const swaks =
    `swaks --to hello@smtpmux.what --from curious@user.com --server ${server} --tls -a PLAIN ` +
    `--auth-user ${LOGIN.user} --auth-password ${LOGIN.pass} --body "hello user"`;
  const lines = [
    '',
    rule,
    ' SMTP Mux demo is running',
    rule,
    ` SMTP Mux   ${server}   (STARTTLS with a self-signed certificate, then AUTH PLAIN as ${LOGIN.user} / ${LOGIN.pass})`,
    ...inboxes.map((inbox, i) => ` Inbox ${i + 1}    ${inbox.webUrl}   (MailDev "${inbox.name}", SMTP on 127.0.0.1:${inbox.smtpPort})`),
    ...(statusUrl ? [` Status     ${statusUrl}   (downstreams, attempts; Prometheus metrics at ${statusUrl}metrics)`] : []),
    '',
    ' Edit these and save: SMTP Mux reloads them while it runs.',
    `   config     ${configFile}`,
    `   selector   ${selectorFile}`,
    '',
    ' Send a message (run it a few times: round robin alternates between the inboxes):',
    '',
    `   ${swaks}`,
    '',
    ' No swaks? `apt install swaks` or `brew install swaks`.',
    ...notes.map((note) => ` Note: ${note}`),
    ' Press Ctrl+C to stop.',
    rule,
    '',
  ];
  say(lines.join('\n'));
}

async function main() {
  if (!fs.existsSync(CLI)) throw new DemoError(`${path.relative(process.cwd(), CLI)} is missing: run \`npm run build\` (or \`npm run demo\`, which builds first)`);
  const notes = [];
  const { dir, copied, kept } = prepareDemoDir();
  if (copied.length) notes.push(`copied ${copied.join(' and ')} into ${dir}`);
  if (kept.length) notes.push(`kept the existing ${kept.join(' and ')} in ${dir}`);
  const configFile = path.join(dir, 'config.yaml');
  const selectorFile = path.join(dir, 'selector.js');

  // SMTP Mux's ports are settled before anything starts, so a taken explicit port fails fast.
  const settlePort = async (envName, preferred, what) => {
    const given = envPort(envName);
    if (given === 0) return freePort();
    if (given === undefined) {
      if (await isFree(preferred)) return preferred;
      const port = await freePort();
      notes.push(`port ${preferred} is taken, so SMTP Mux's ${what} is on ${port} (set ${envName} to choose)`);
      return port;
    }
    if (!(await isFree(given))) throw new DemoError(`${envName}=${given} is already in use`);
    return given;
  };
  const smtpPort = await settlePort('SMTPMUX_PORT', 2525, 'SMTP listener');
  const httpPort = await settlePort('SMTPMUX_HTTP_PORT', 9587, 'status page');

  const inboxes = [];
  let child;
  let stopping = false;
  let stopSignal;
  let exiting = false;

  const finish = async (code) => {
    if (exiting) return;
    exiting = true;
    await Promise.all(inboxes.map(stopInbox));
    process.exit(code);
  };

  let stoppingSince = 0;
  const onSignal = (signal) => {
    if (stopping) {
      // A second Ctrl+C: stop waiting for the graceful shutdown. (One within a second of the first is
      // the same signal arriving twice, e.g. from the terminal and from a parent that forwards it.)
      if (Date.now() - stoppingSince < 1000) return;
      if (child && child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      return;
    }
    stopping = true;
    stoppingSince = Date.now();
    stopSignal = signal;
    if (!child) {
      void finish(0);
      return;
    }
    say(`\ndemo: ${signal}: stopping SMTP Mux, then the inboxes...`);
    // SIGHUP means our terminal went away: ask SMTP Mux to stop, not to reload.
    child.kill(signal === 'SIGHUP' ? 'SIGTERM' : signal);
    setTimeout(() => {
      warn(`SMTP Mux did not stop within ${STOP_TIMEOUT_MS / 1000} s; killing it`);
      child.kill('SIGKILL');
    }, STOP_TIMEOUT_MS).unref();
  };
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.on(signal, onSignal);

  try {
    for (const spec of INBOXES) {
      if (stopping) break;
      inboxes.push(await startInbox(spec));
    }
  } catch (err) {
    await Promise.all(inboxes.map(stopInbox));
    throw err;
  }
  if (stopping) return finish(0);

  const logMode = process.env.SMTPMUX_DEMO_LOG || (process.stdout.isTTY ? 'pretty' : 'json');
  const env = { ...process.env, SMTPMUX_PORT: String(smtpPort), SMTPMUX_HTTP_PORT: String(httpPort) };
  inboxes.forEach((inbox, i) => {
    env[`DEMO_INBOX${i + 1}_PORT`] = String(inbox.smtpPort);
    env[`DEMO_INBOX${i + 1}_WEB_PORT`] = String(inbox.webPort);
  });
  // Its own process group (not on Windows), so a Ctrl+C in the terminal reaches SMTP Mux once, through
  // us, instead of twice (once from the terminal, once forwarded).
  child = spawn(process.execPath, ['--no-node-snapshot', CLI, 'serve', '--config', configFile], {
    cwd: ROOT,
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: process.platform !== 'win32',
  });
  process.on('exit', () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });

  let ready = false;
  const listenTimer = setTimeout(() => {
    if (!ready) warn(`SMTP Mux has not said "SMTP Mux listening" after ${LISTEN_TIMEOUT_MS / 1000} s; see its log above`);
  }, LISTEN_TIMEOUT_MS);
  listenTimer.unref();

  readline.createInterface({ input: child.stdout, crlfDelay: Infinity }).on('line', (line) => {
    let record;
    try {
      record = JSON.parse(line);
    } catch {
      record = undefined;
    }
    if (record && typeof record === 'object') {
      say(logMode === 'json' ? line : prettyLine(record));
      if (!ready && record.msg === 'SMTP Mux listening') {
        ready = true;
        clearTimeout(listenTimer);
        const statusUrl = typeof record.http === 'string' ? record.http : undefined;
        const readyInfo = {
          smtp: { host: record.host || '127.0.0.1', port: Number(record.port) || smtpPort },
          http: statusUrl ? { port: Number(record.httpPort), url: statusUrl } : undefined,
          inboxes: inboxes.map((inbox) => ({ name: inbox.name, smtpPort: inbox.smtpPort, webPort: inbox.webPort, webUrl: inbox.webUrl })),
          config: configFile,
          selector: selectorFile,
        };
        banner({ smtpHost: readyInfo.smtp.host, smtpPort: readyInfo.smtp.port, statusUrl, inboxes, configFile, selectorFile, notes });
        // One machine-readable line for scripts and tests that drive the demo (not on a terminal).
        if (!process.stdout.isTTY) say(`demo ready ${JSON.stringify(readyInfo)}`);
      }
    } else {
      say(line);
    }
  });
  child.stderr.pipe(process.stderr);

  child.on('error', (err) => {
    warn(`cannot start SMTP Mux: ${err.message}`);
    void finish(1);
  });
  // 'close', not 'exit': by then SMTP Mux's last log lines have been read.
  child.on('close', (code, signal) => {
    if (!stopping) warn(`SMTP Mux exited (${signal ? `signal ${signal}` : `code ${code}`}); stopping the inboxes`);
    let exitCode = code;
    if (exitCode === null) exitCode = signal === stopSignal && stopSignal !== undefined ? 0 : 128 + (os.constants.signals[signal] || 0);
    void finish(exitCode);
  });
}

main().catch((err) => {
  warn(err instanceof DemoError ? err.message : err.stack || String(err));
  process.exit(1);
});
