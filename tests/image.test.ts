// The image contract without an image builder of our own: the Dockerfile passes a maintained linter
// (dockerfile-utils), and what its runtime stage copies (read from its COPY lines, so this cannot drift)
// is staged into a temp folder standing for WORKDIR and run the way the image runs it: `check`, then
// ENTRYPOINT + CMD, the HEALTHCHECK command, and SIGTERM, as an unprivileged user with the image's ENV.
// Where a Docker engine answers, the real image is built and run as well.
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import dockerignore from '@balena/dockerignore';
import { validate } from 'dockerfile-utils';
import { DOCKERFILE, readRuntimeStage, type RuntimeStage } from './support/dockerfile';
import { testConfig } from './support/config';
import { startDownstream, type Downstream } from './support/downstream';
import { sendWithNodemailer } from './support/clients';

const REPO = path.resolve(__dirname, '..');
/** The user the staged image runs as: nobody/nogroup, like the image's non-root USER. */
const UNPRIVILEGED = { uid: 65534, gid: 65534 };
const isRoot = process.getuid?.() === 0;

test('the Dockerfile has no lint errors (dockerfile-utils)', () => {
  const problems = validate(readFileSync(DOCKERFILE, 'utf8'));
  // Severity 1 is an error; warnings are shown but do not fail.
  const shown = problems.map((p) => `Dockerfile:${p.range.start.line + 1}: ${p.severity === 1 ? 'error' : 'warning'}: ${p.message}`);
  if (shown.length > 0) console.log(shown.join('\n'));
  expect(problems.filter((p) => p.severity === 1).map((p) => `Dockerfile:${p.range.start.line + 1}: ${p.message}`)).toEqual([]);
});

test('every file a COPY takes from the build context gets past .dockerignore', () => {
  const ignore = dockerignore({ ignorecase: false }).add(readFileSync(path.join(REPO, '.dockerignore'), 'utf8'));
  const { contextSources } = readRuntimeStage();
  expect(contextSources.length).toBeGreaterThan(0);
  const left: string[] = [];
  for (const { source, line } of contextSources) {
    // The files git knows under it: what a clean checkout sends (a folder is checked file by file).
    const files = execFileSync('git', ['ls-files', '--', source], { cwd: REPO, encoding: 'utf8' }).split('\n').filter(Boolean);
    if (files.length === 0) left.push(`Dockerfile:${line}: COPY ${source}: no such file in the repository`);
    for (const file of files) if (ignore.ignores(file)) left.push(`Dockerfile:${line}: COPY ${source}: .dockerignore leaves out ${file}`);
  }
  expect(left).toEqual([]);
});

test('the Dockerfile runs its runtime stage as a non-root user with exec-form ENTRYPOINT and HEALTHCHECK', () => {
  const stage = readRuntimeStage();
  expect(stage.user).toBeDefined();
  expect(stage.user).not.toMatch(/^(root|0)(:|$)/);
  expect(stage.entrypoint.length).toBeGreaterThan(0);
  expect(stage.healthcheck).toBeDefined();
});

/** Runs `argv` to completion as the unprivileged user; never rejects. */
function runAs(argv: readonly string[], options: { cwd: string; env: NodeJS.ProcessEnv; timeoutMs: number }): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(argv[0], argv.slice(1), { ...options, ...UNPRIVILEGED, timeout: options.timeoutMs }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as NodeJS.ErrnoException).code === 'number' ? Number((err as NodeJS.ErrnoException).code) : null) : 0;
      resolve({ code, stdout: String(stdout), stderr: String(stderr) });
    });
  });
}

async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

/**
 * Lays out what the runtime stage's COPY lines put under WORKDIR. Sources from the build context come
 * from this checkout; from a build stage, `node_modules` is `npm ci --omit=dev` (the stage installs and
 * prunes to production) and anything else is the same path here (`npm test` has just built dist/).
 */
function stageImage(stage: RuntimeStage, root: string): string {
  const app = path.join(root, 'app');
  mkdirSync(app, { recursive: true });
  for (const copy of stage.copies) {
    for (const source of copy.sources) {
      if (source.startsWith('..') || path.isAbsolute(source)) throw new Error(`Dockerfile:${copy.line}: cannot stage ${source} (outside the stage's WORKDIR)`);
      let from = path.join(REPO, source);
      if (copy.from !== undefined && source === 'node_modules') {
        const build = path.join(root, 'build');
        mkdirSync(build);
        for (const file of ['package.json', 'package-lock.json']) cpSync(path.join(REPO, file), path.join(build, file));
        execFileSync('npm', ['ci', '--omit=dev', '--no-audit', '--no-fund', '--prefer-offline', '--loglevel=error'], { cwd: build, stdio: 'pipe', timeout: 240_000 });
        from = path.join(build, 'node_modules');
      }
      if (!existsSync(from)) throw new Error(`Dockerfile:${copy.line}: COPY ${source}: ${from} does not exist`);
      cpSync(from, path.join(app, copy.dest === '' ? path.basename(source) : copy.dest), { recursive: true });
    }
  }
  return app;
}

/** The image's argv with its absolute WORKDIR paths pointing into the staged folder. */
const inStaged = (argv: readonly string[], stage: RuntimeStage, app: string): string[] =>
  argv.map((a) => (a === stage.workdir || a.startsWith(`${stage.workdir}/`) ? path.join(app, a.slice(stage.workdir.length)) : a));

(isRoot ? describe : describe.skip)('the runtime stage, staged from the Dockerfile and run as an unprivileged user', () => {
  let stage: RuntimeStage;
  let root: string;
  let app: string;
  let env: NodeJS.ProcessEnv;
  let ds: Downstream;
  let serve: ChildProcess | undefined;

  beforeAll(async () => {
    stage = readRuntimeStage();
    // The build stage's node_modules is production-only; the staging below relies on it.
    expect(stage.runsOf('build').some((run) => /npm (ci|prune|install)\b.*--omit=dev/.test(run))).toBe(true);
    root = mkdtempSync(path.join(os.tmpdir(), 'smtpmux-image-'));
    chmodSync(root, 0o755); // owned by root, readable by the app's user, writable by nobody but root: as in the image
    app = stageImage(stage, root);
    ds = await startDownstream();
    // The config the image reads (mounted at WORKDIR/config); only the listen addresses differ from a
    // deployment: loopback (tests bind 127.0.0.1) on free ports, which the health check reads from it.
    mkdirSync(path.join(app, 'config'));
    writeFileSync(
      path.join(app, 'config', 'config.yaml'),
      testConfig({
        listen: { host: '127.0.0.1', port: await freePort() },
        http: { host: '127.0.0.1', port: await freePort() },
        selector: 'round-robin.js',
        downstreams: [{ name: 'inbox', addr: ds.addr }],
      }),
    );
    // The image's ENV and nothing of this shell's environment but PATH (for `node`); the listeners the
    // image opens on every interface stay on loopback here.
    env = { PATH: process.env.PATH, ...stage.env, SMTPMUX_HOST: '127.0.0.1', SMTPMUX_HTTP_HOST: '127.0.0.1' };
  }, 300_000);

  afterAll(async () => {
    serve?.kill('SIGKILL');
    await ds?.close();
    if (root) rmSync(root, { recursive: true, force: true });
  });

  test('check, serve (a message goes through), the HEALTHCHECK command, SIGTERM exits 0, then the health check fails', async () => {
    const argv = inStaged([...stage.entrypoint, ...stage.cmd], stage, app);
    const subcommand = stage.cmd[0];
    expect(subcommand).toBe('serve');

    const check = await runAs(argv.map((a, i) => (i === stage.entrypoint.length ? 'check' : a)), { cwd: app, env, timeoutMs: 60_000 });
    expect({ code: check.code, stderr: check.stderr }).toEqual({ code: 0, stderr: '' });
    expect(check.stdout).toMatch(/OK \(1 user\(s\), 1 downstream\(s\), 1 selector\(s\) compiled\)/);

    const child = spawn(argv[0], argv.slice(1), { cwd: app, env, ...UNPRIVILEGED, stdio: ['ignore', 'pipe', 'pipe'] });
    serve = child;
    let out = '';
    child.stdout!.on('data', (c: Buffer) => (out += c.toString()));
    child.stderr!.on('data', (c: Buffer) => (out += c.toString()));
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    const listening = await Promise.race([
      new Promise<number>((resolve) => {
        const look = (): void => {
          const line = out.split('\n').find((l) => l.includes('SMTP Mux listening'));
          if (line) resolve((JSON.parse(line) as { port: number }).port);
        };
        child.stdout!.on('data', look);
      }),
      exited.then((code) => {
        throw new Error(`serve exited (${code}) before listening:\n${out}`);
      }),
      new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`serve did not listen within 30 s:\n${out}`)), 30_000).unref()),
    ]);

    // It really runs as the unprivileged user.
    expect(readFileSync(`/proc/${child.pid}/status`, 'utf8')).toMatch(new RegExp(`^Uid:\\s+${UNPRIVILEGED.uid}\\s`, 'm'));

    const sent = await sendWithNodemailer(listening, { subject: 'through the staged image' });
    expect(sent.code).toBe(250);
    expect(ds.received).toHaveLength(1);

    const health = await runAs(inStaged(stage.healthcheck!, stage, app), { cwd: app, env, timeoutMs: 30_000 });
    expect({ code: health.code, stderr: health.stderr }).toEqual({ code: 0, stderr: '' });

    child.kill('SIGTERM');
    const code = await Promise.race([exited, new Promise<string>((resolve) => setTimeout(() => resolve('still running 30 s after SIGTERM'), 30_000).unref())]);
    expect(code).toBe(0);
    expect(out).toMatch(/"msg":"stopped"/);

    const unhealthy = await runAs(inStaged(stage.healthcheck!, stage, app), { cwd: app, env, timeoutMs: 30_000 });
    expect(unhealthy.code).not.toBe(0);
  }, 120_000);
});

/** True when a Docker engine answers (`docker info` succeeds). */
function dockerEngine(): boolean {
  try {
    execFileSync('docker', ['info'], { stdio: 'ignore', timeout: 20_000 });
    return true;
  } catch {
    return false;
  }
}

(dockerEngine() ? describe : describe.skip)('the image itself (a Docker engine answers)', () => {
  const tag = `smtpmux:test-${process.pid}`;
  const docker = (args: string[], timeoutMs = 60_000): string => execFileSync('docker', args, { encoding: 'utf8', timeout: timeoutMs, stdio: ['ignore', 'pipe', 'pipe'] }).trim();
  let container = '';

  afterAll(() => {
    if (container) execFile('docker', ['rm', '-f', container], () => undefined);
    execFile('docker', ['rmi', '-f', tag], () => undefined);
  });

  test('builds; check passes; run as the README says it becomes healthy; docker stop exits 0', async () => {
    docker(['build', '-t', tag, REPO], 20 * 60_000);
    // As the README runs it: config/compose mounted at /app/config (its downstreams are compose services,
    // not reachable here, and are not needed for check, the health check or shutdown).
    const mount = ['-v', `${path.join(REPO, 'config', 'compose')}:/app/config:ro`];
    docker(['run', '--rm', ...mount, tag, 'check', '--config', '/app/config/config.yaml']);
    container = docker(['run', '-d', ...mount, '--health-interval=1s', '--health-start-period=30s', tag]);
    const deadline = Date.now() + 60_000;
    let health = '';
    while (health !== 'healthy' && Date.now() < deadline) {
      health = docker(['inspect', '--format', '{{.State.Health.Status}}', container]);
      if (health !== 'healthy') await new Promise((resolve) => setTimeout(resolve, 500));
    }
    expect(health).toBe('healthy');
    docker(['stop', '--time', '30', container], 60_000);
    expect(docker(['inspect', '--format', '{{.State.ExitCode}}', container])).toBe('0');
  }, 25 * 60_000);
});

if (!isRoot) {
  test.skip('the staged runtime stage (needs root to run as an unprivileged user: run the suite as root, as CI does)', () => undefined);
}
