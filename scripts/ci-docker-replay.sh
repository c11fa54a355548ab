#!/usr/bin/env bash
# Replays the Dockerfile without a Docker engine, so CI catches a broken image: a build step that no
# longer works, a file the runtime stage forgot to COPY, a context file .dockerignore leaves out.
#
#  1. The build context: the files of the working tree that git tracks, plus untracked ones it does not
#     ignore (uncommitted edits included), filtered through .dockerignore like `docker build` does.
#  2. Every stage of the Dockerfile, in order, each in its own folder standing in for "/": WORKDIR,
#     ENV, COPY (from the context or --from an earlier stage) and RUN are carried out; RUN lines that
#     install system packages (apt-get ...) are skipped, since this machine already has the toolchain.
#  3. The last stage is then run as the README runs the image, with config/compose mounted at
#     /app/config: `check` on the CMD's config, then the ENTRYPOINT + CMD server itself, the HEALTHCHECK
#     command against it, and SIGTERM, which must end it with exit code 0. As an unprivileged user
#     when started as root, with the image's ENV and nothing of this shell's environment but PATH.
#
# Usage: scripts/ci-docker-replay.sh            (KEEP_REPLAY=1 keeps the temp folder for a look)
# Needs: node >= 22 and npm on PATH, git, network access to the npm registry. Exits non-zero on any
# failure; every step has a time limit.
#
# RUN lines in the Dockerfile must use paths relative to WORKDIR: here "/" is not the stage's root.
set -euo pipefail

cd "$(dirname "$0")/.."
exec node - "$@" <<'NODE'
'use strict';
const { spawn, execFileSync } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');

const REPO = process.cwd();
const MINUTE = 60_000;
const LIMITS = { run: 10 * MINUTE, check: 1 * MINUTE, listen: 45_000, health: 30_000, stop: 30_000 };
/** The mount the replay gives the image, as docker-compose.yml and the Dockerfile's header do. */
const CONFIG_MOUNT = { from: path.join(REPO, 'config', 'compose'), to: '/app/config' };
/** What the compose file sets for the service (USE_INSECURE_AUTH) plus a loopback listener for CI. */
const RUN_ENV = { USE_INSECURE_AUTH: 'true', SMTPMUX_HOST: '127.0.0.1', SMTPMUX_HTTP_HOST: '127.0.0.1' };

const started = Date.now();
const step = (text) => console.log(`\n==> [${((Date.now() - started) / 1000).toFixed(0)}s] ${text}`);
const fail = (text) => {
  console.error(`\nci-docker-replay: FAILED: ${text}`);
  process.exit(1);
};

// ---------------------------------------------------------------- Dockerfile

/** Instructions of the Dockerfile, continuation lines joined, comments dropped. */
function parseDockerfile(text) {
  const out = [];
  let pending = '';
  for (const raw of text.split(/\r?\n/)) {
    if (!pending && /^\s*#/.test(raw)) continue;
    if (pending && /^\s*#/.test(raw)) continue; // comments inside a continued instruction
    const line = raw.replace(/\s+$/, '');
    if (line.endsWith('\\')) {
      pending += line.slice(0, -1) + ' ';
      continue;
    }
    const full = (pending + line).trim();
    pending = '';
    if (!full) continue;
    const m = /^(\w+)\s+([\s\S]*)$/.exec(full);
    if (!m) fail(`Dockerfile: cannot read "${full}"`);
    out.push({ op: m[1].toUpperCase(), args: m[2].trim() });
  }
  return out;
}

/** Splits `a "b c" d=e` into words, honouring double and single quotes. */
function words(text) {
  const out = [];
  const re = /"((?:[^"\\]|\\.)*)"|'([^']*)'|([^\s"']+)/g;
  let m;
  let current = null;
  // Keep key="quoted value" together: glue tokens that touch.
  let lastEnd = -1;
  while ((m = re.exec(text))) {
    const piece = m[1] !== undefined ? m[1].replace(/\\(.)/g, '$1') : m[2] !== undefined ? m[2] : m[3];
    if (current !== null && m.index === lastEnd) current += piece;
    else {
      if (current !== null) out.push(current);
      current = piece;
    }
    lastEnd = re.lastIndex;
  }
  if (current !== null) out.push(current);
  return out;
}

/** An exec-form (JSON array) argument list, or null for shell form. */
function execForm(args) {
  if (!args.startsWith('[')) return null;
  try {
    const list = JSON.parse(args);
    if (Array.isArray(list) && list.every((x) => typeof x === 'string')) return list;
  } catch {}
  fail(`Dockerfile: "${args}" looks like exec form but is not a JSON array of strings`);
}

function substitute(text, vars) {
  return text.replace(/\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)/g, (whole, a, fallback, b) => {
    const name = a || b;
    if (vars[name] !== undefined && vars[name] !== '') return vars[name];
    return fallback !== undefined ? fallback : '';
  });
}

// ---------------------------------------------------------------- build context

/** Docker's .dockerignore pattern → RegExp over a slash-separated relative path. */
function patternToRegExp(pattern) {
  let re = '';
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i];
    if (c === '*') {
      if (pattern[i + 1] === '*') {
        i++;
        if (pattern[i + 1] === '/') {
          i++;
          re += '(?:.*/)?';
        } else re += '.*';
      } else re += '[^/]*';
    } else if (c === '?') re += '[^/]';
    else if (c === '[') {
      const end = pattern.indexOf(']', i);
      if (end < 0) re += '\\[';
      else {
        re += pattern.slice(i, end + 1).replace(/^\[!/, '[^');
        i = end;
      }
    } else if (c === '\\' && i + 1 < pattern.length) re += `\\${pattern[++i]}`;
    else re += c.replace(/[.+^${}()|/]/g, '\\$&');
  }
  return new RegExp(`^${re}$`);
}

function readDockerignore(file) {
  if (!fs.existsSync(file)) return [];
  return fs
    .readFileSync(file, 'utf8')
    .split(/\r?\n/)
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('#'))
    .map((l) => {
      const negate = l.startsWith('!');
      let p = path.posix.normalize((negate ? l.slice(1) : l).trim()).replace(/^\/+/, '');
      if (p === '.') p = '';
      return { negate, re: patternToRegExp(p) };
    });
}

/** Like `docker build`: the last pattern that matches the path or one of its parent folders decides. */
function ignored(rel, patterns) {
  const parts = rel.split('/');
  const prefixes = parts.map((_, i) => parts.slice(0, i + 1).join('/'));
  let out = false;
  for (const { negate, re } of patterns) {
    if (prefixes.some((p) => re.test(p))) out = !negate;
  }
  return out;
}

function contextFiles() {
  let list;
  try {
    list = execFileSync('git', ['ls-files', '-z', '--cached', '--others', '--exclude-standard'], { cwd: REPO, maxBuffer: 64 << 20 })
      .toString('utf8')
      .split('\0')
      .filter(Boolean);
  } catch {
    fail('git ls-files failed: run this from a git work tree');
  }
  // Tracked but deleted in the working tree: not in the context.
  return [...new Set(list)].filter((f) => {
    const st = fs.lstatSync(path.join(REPO, f), { throwIfNoEntry: false });
    return st !== undefined && (st.isFile() || st.isSymbolicLink());
  });
}

// ---------------------------------------------------------------- running things

/** Runs a command in its own process group; kills the whole group when the time limit runs out. */
function run(cmd, args, { cwd, env, limitMs, label, asUser, capture }) {
  return new Promise((resolve) => {
    const [file, argv] = asUser ? ['setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', '--', cmd, ...args]] : [cmd, args];
    const child = spawn(file, argv, { cwd, env, stdio: ['ignore', capture ? 'pipe' : 'inherit', 'inherit'], detached: true });
    let out = '';
    if (capture) child.stdout.on('data', (d) => { out += d; process.stdout.write(d); });
    const timer = setTimeout(() => {
      console.error(`ci-docker-replay: ${label} did not finish within ${limitMs / 1000} s; killing it`);
      try { process.kill(-child.pid, 'SIGKILL'); } catch {}
    }, limitMs);
    child.on('error', (err) => { clearTimeout(timer); resolve({ code: 127, signal: null, out, error: err }); });
    child.on('close', (code, signal) => { clearTimeout(timer); resolve({ code, signal, out }); });
  });
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

// ---------------------------------------------------------------- main

async function main() {
  const dockerfile = path.join(REPO, 'Dockerfile');
  if (!fs.existsSync(dockerfile)) fail('no Dockerfile');
  const instructions = parseDockerfile(fs.readFileSync(dockerfile, 'utf8'));
  const asUser = process.getuid && process.getuid() === 0;

  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'smtpmux-replay-'));
  fs.chmodSync(tmp, 0o755); // the unprivileged run must be able to reach the runtime stage
  const cleanup = () => {
    if (process.env.KEEP_REPLAY === '1') console.log(`kept ${tmp}`);
    else fs.rmSync(tmp, { recursive: true, force: true });
  };
  process.on('exit', cleanup);
  for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(130));

  step('build context: working-tree files git knows about, filtered by .dockerignore');
  const patterns = readDockerignore(path.join(REPO, '.dockerignore'));
  const context = path.join(tmp, 'context');
  let count = 0;
  for (const rel of contextFiles()) {
    if (ignored(rel, patterns)) continue;
    const dest = path.join(context, rel);
    fs.mkdirSync(path.dirname(dest), { recursive: true });
    fs.cpSync(path.join(REPO, rel), dest, { verbatimSymlinks: true, preserveTimestamps: true });
    count++;
  }
  console.log(`${count} files in the context`);

  const args = {};
  const stages = [];
  let stage = null;
  const stageByName = (name) => stages.find((s) => s.name === name) || stages[Number(name)];
  const inStage = (s, p) => path.join(s.root, path.posix.resolve(s.workdir, p));

  for (const { op, args: rawArgs } of instructions) {
    if (op === 'ARG') {
      const [name, ...rest] = rawArgs.split('=');
      if (!stage) args[name.trim()] = substitute(rest.join('='), { ...args });
      else if (stage.env[name.trim()] === undefined && rest.length) stage.env[name.trim()] = rest.join('=');
      continue;
    }
    if (op === 'FROM') {
      const w = words(substitute(rawArgs, args)).filter((x) => !x.startsWith('--'));
      const name = w[1] && w[1].toLowerCase() === 'as' ? w[2] : String(stages.length);
      stage = { name, image: w[0], root: path.join(tmp, 'stages', name), workdir: '/', env: {}, user: 'root', meta: {} };
      fs.mkdirSync(stage.root, { recursive: true });
      stages.push(stage);
      step(`stage ${name} (FROM ${w[0]})`);
      const imageMajor = /node:(\d+)/.exec(w[0]);
      const major = process.versions.node.split('.')[0];
      if (imageMajor && imageMajor[1] !== major) console.warn(`warning: the image has Node ${imageMajor[1]}, this replay runs Node ${major}`);
      continue;
    }
    if (!stage) fail(`Dockerfile: ${op} before FROM`);
    const vars = { ...args, ...stage.env };
    switch (op) {
      case 'WORKDIR': {
        stage.workdir = path.posix.resolve(stage.workdir, substitute(rawArgs, vars));
        fs.mkdirSync(path.join(stage.root, stage.workdir), { recursive: true });
        console.log(`WORKDIR ${stage.workdir}`);
        break;
      }
      case 'ENV': {
        const w = words(rawArgs);
        if (w.length >= 2 && !w[0].includes('=')) stage.env[w[0]] = substitute(w.slice(1).join(' '), vars);
        else for (const kv of w) {
          const at = kv.indexOf('=');
          if (at < 1) fail(`Dockerfile: ENV ${rawArgs}: cannot read "${kv}"`);
          stage.env[kv.slice(0, at)] = substitute(kv.slice(at + 1), { ...vars, ...stage.env });
        }
        console.log(`ENV ${rawArgs}`);
        break;
      }
      case 'COPY':
      case 'ADD': {
        const w = words(substitute(rawArgs, vars));
        const flags = w.filter((x) => x.startsWith('--'));
        const list = execForm(rawArgs) || w.filter((x) => !x.startsWith('--'));
        const fromFlag = flags.find((f) => f.startsWith('--from='));
        const from = fromFlag ? stageByName(fromFlag.slice(7)) : null;
        if (fromFlag && !from) fail(`COPY ${rawArgs}: no earlier stage "${fromFlag.slice(7)}" (copying from an image is not replayed)`);
        const dest = list.pop();
        const destPath = inStage(stage, dest);
        const srcBase = from ? from.root : context;
        const srcs = [];
        for (const src of list) {
          const rel = from ? path.posix.resolve('/', src) : path.posix.normalize(src);
          const dir = path.join(srcBase, path.posix.dirname(rel));
          const base = path.posix.basename(rel);
          if (/[*?[]/.test(base)) {
            const re = patternToRegExp(base);
            const hits = fs.existsSync(dir) ? fs.readdirSync(dir).filter((n) => re.test(n)).map((n) => path.join(dir, n)) : [];
            if (!hits.length) fail(`COPY ${rawArgs}: "${src}" matches nothing${from ? ` in stage ${from.name}` : ' in the build context (.dockerignore?)'}`);
            srcs.push(...hits);
          } else {
            const p = path.join(srcBase, rel);
            if (!fs.existsSync(p)) fail(`COPY ${rawArgs}: "${src}" not found${from ? ` in stage ${from.name}` : ' in the build context (is it in .dockerignore, or not in git?)'}`);
            srcs.push(p);
          }
        }
        const intoDir = dest.endsWith('/') || srcs.length > 1 || (fs.existsSync(destPath) && fs.statSync(destPath).isDirectory());
        for (const src of srcs) {
          if (fs.statSync(src).isDirectory()) {
            fs.mkdirSync(destPath, { recursive: true });
            fs.cpSync(src, destPath, { recursive: true, verbatimSymlinks: true, preserveTimestamps: true });
          } else {
            const target = intoDir ? path.join(destPath, path.basename(src)) : destPath;
            fs.mkdirSync(path.dirname(target), { recursive: true });
            fs.cpSync(src, target, { verbatimSymlinks: true, preserveTimestamps: true });
          }
        }
        console.log(`${op} ${rawArgs}`);
        break;
      }
      case 'RUN': {
        const exec = execForm(rawArgs);
        const shown = exec ? exec.join(' ') : rawArgs;
        if (/^\s*(apt-get|apt|apk|yum|dnf|microdnf)\b/.test(shown)) {
          console.log(`RUN ${shown}\n    (skipped: system packages; this machine provides its own)`);
          break;
        }
        console.log(`RUN ${shown}`);
        const [cmd, argv] = exec ? [exec[0], exec.slice(1)] : ['sh', ['-c', rawArgs]];
        const res = await run(cmd, argv, {
          cwd: path.join(stage.root, stage.workdir),
          // The lockfile pins every version and hash: the npm cache may answer without asking the registry.
          env: { npm_config_prefer_offline: 'true', ...process.env, ...stage.env },
          limitMs: LIMITS.run,
          label: `RUN ${shown}`,
        });
        if (res.code !== 0) fail(`RUN ${shown} exited with ${res.signal || res.code} in stage ${stage.name}`);
        break;
      }
      case 'USER':
        stage.user = rawArgs;
        break;
      case 'ENTRYPOINT':
      case 'CMD':
      case 'HEALTHCHECK':
      case 'EXPOSE':
      case 'STOPSIGNAL':
        stage.meta[op] = rawArgs;
        break;
      case 'LABEL':
      case 'VOLUME':
      case 'SHELL':
      case 'ONBUILD':
        break;
      default:
        fail(`Dockerfile: ${op} is not something this replay understands; teach scripts/ci-docker-replay.sh`);
    }
  }

  // ------------------------------------------------------------ the image, run
  const image = stages[stages.length - 1];
  if (!image) fail('Dockerfile has no FROM');
  const entrypoint = image.meta.ENTRYPOINT ? execForm(image.meta.ENTRYPOINT) : [];
  const cmd = image.meta.CMD ? execForm(image.meta.CMD) : [];
  if (!entrypoint || !cmd) fail('ENTRYPOINT and CMD must be in exec form (JSON arrays), so PID 1 gets the signals');
  const health = /CMD\s+(\[.*\])\s*$/.exec(image.meta.HEALTHCHECK || '');
  if (!health) fail('HEALTHCHECK must run a command in exec form: HEALTHCHECK ... CMD ["node", ...]');
  const healthCmd = execForm(health[1]);

  // Mount the compose config like `-v ./config/compose:/app/config:ro`.
  const mountAt = path.join(image.root, CONFIG_MOUNT.to);
  fs.rmSync(mountAt, { recursive: true, force: true });
  fs.cpSync(CONFIG_MOUNT.from, mountAt, { recursive: true });

  // Absolute paths in the image's commands point into the stage's root.
  const mapArg = (a) => (a.startsWith('/') && fs.existsSync(path.join(image.root, a.split('/')[1] || '')) ? path.join(image.root, a) : a);
  const cwd = path.join(image.root, image.workdir);
  const exe = (argv) => [argv[0], argv.slice(1).map(mapArg)];
  const home = path.join(tmp, 'home');
  fs.mkdirSync(home, { mode: 0o777 });
  fs.chmodSync(home, 0o777);
  const baseEnv = { PATH: process.env.PATH, HOME: home, ...image.env, ...RUN_ENV };
  if (asUser) console.log('\n(running the image as uid 65534, as the image does not run as root)');

  const configAt = cmd.indexOf('--config');
  if (configAt < 0 || !cmd[configAt + 1]) fail('CMD should name its config: ["serve", "--config", "/app/config/config.yaml"]');
  step(`check: ${[...entrypoint, 'check', '--config', cmd[configAt + 1]].join(' ')}`);
  {
    const [file, argv] = exe([...entrypoint, 'check', '--config', cmd[configAt + 1]]);
    const res = await run(file, argv, { cwd, env: baseEnv, limitMs: LIMITS.check, label: 'check', asUser });
    if (res.code !== 0) fail(`check exited with ${res.signal || res.code}`);
  }

  const port = await freePort();
  const httpPort = await freePort();
  step(`serve: ${[...entrypoint, ...cmd].join(' ')}   (SMTPMUX_PORT=${port}, SMTPMUX_HTTP_PORT=${httpPort}, on 127.0.0.1)`);
  const env = { ...baseEnv, SMTPMUX_PORT: String(port), SMTPMUX_HTTP_PORT: String(httpPort) };
  const [file, argv] = exe([...entrypoint, ...cmd]);
  const [sFile, sArgv] = asUser ? ['setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', '--', file, ...argv]] : [file, argv];
  const server = spawn(sFile, sArgv, { cwd, env, stdio: ['ignore', 'pipe', 'inherit'], detached: true });
  const killServer = () => { try { process.kill(-server.pid, 'SIGKILL'); } catch {} };
  process.on('exit', killServer);
  const exited = new Promise((resolve) => server.on('close', (code, signal) => resolve({ code, signal })));
  let serverExit = null;
  exited.then((r) => { serverExit = r; });
  const listening = new Promise((resolve) => {
    let buf = '';
    server.stdout.on('data', (d) => {
      process.stdout.write(d);
      buf += d;
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        try {
          if (JSON.parse(line).msg === 'SMTP Mux listening') resolve(true);
        } catch {}
      }
    });
    setTimeout(() => resolve(false), LIMITS.listen).unref();
    exited.then(() => resolve(false));
  });
  if (!(await listening)) {
    killServer();
    fail(serverExit ? `serve exited (${serverExit.signal || serverExit.code}) before listening` : `serve did not log "SMTP Mux listening" within ${LIMITS.listen / 1000} s`);
  }

  step(`HEALTHCHECK: ${healthCmd.join(' ')}`);
  {
    const [hFile, hArgv] = exe(healthCmd);
    const res = await run(hFile, hArgv, { cwd, env, limitMs: LIMITS.health, label: 'health', asUser });
    if (res.code !== 0) {
      killServer();
      fail(`the HEALTHCHECK command exited with ${res.signal || res.code} while the server was up`);
    }
  }

  step('SIGTERM to the server: it must drain and exit 0');
  process.kill(server.pid, 'SIGTERM');
  const stopped = await Promise.race([exited, new Promise((r) => setTimeout(() => r(null), LIMITS.stop).unref())]);
  if (!stopped) {
    killServer();
    fail(`the server did not exit within ${LIMITS.stop / 1000} s of SIGTERM`);
  }
  if (stopped.code !== 0) fail(`the server exited with ${stopped.signal || stopped.code} after SIGTERM (expected 0)`);

  step(`image replay passed in ${((Date.now() - started) / 1000).toFixed(0)} s`);
}

main().catch((err) => fail(err && err.stack ? err.stack : String(err)));
NODE
