// The built CLI (dist/cli.js) as a separate process, the way users run it: `check` to completion, and
// `serve` in the background with its stdout/stderr captured and its port read from the start-up log line.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';

export const CLI = path.resolve(__dirname, '..', '..', 'dist', 'cli.js');

/** The environment of this test process minus the given variables. */
export function envWithout(...names: string[]): NodeJS.ProcessEnv {
  const env = { ...process.env };
  for (const name of names) delete env[name];
  return env;
}

/** Runs the CLI to completion; `env` replaces this process's environment when given. */
export function runCli(args: string[], options: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], { env: options.env ?? process.env, timeout: options.timeoutMs ?? 30_000 }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as NodeJS.ErrnoException).code === 'number' ? Number((err as NodeJS.ErrnoException).code) : 1) : 0;
      resolve({ code, stdout: String(stdout), stderr: String(stderr) });
    });
  });
}

export interface ServeProcess {
  readonly child: ChildProcess;
  /** The SMTP port, from the "SMTP Mux listening" log line. */
  readonly port: number;
  /** The admin HTTP port from the same line; undefined with `http: false`. */
  readonly httpPort: number | undefined;
  stdout(): string;
  stderr(): string;
  /** Resolves with the exit code (null when killed by a signal). */
  readonly exited: Promise<number | null>;
  /** Waits until stdout matches. */
  waitFor(pattern: RegExp, timeoutMs?: number): Promise<void>;
  /** SIGKILL if still running; for afterAll. */
  kill(): Promise<void>;
}

export async function startServe(configPath: string, env: NodeJS.ProcessEnv, timeoutMs = 20_000): Promise<ServeProcess> {
  // The admin listener on a port the OS picks unless the test says otherwise: never the default 9587.
  const child = spawn(process.execPath, [CLI, 'serve', '--config', configPath], { env: { SMTPMUX_HTTP_PORT: '0', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  const watchers = new Set<() => void>();
  child.stdout!.on('data', (chunk: Buffer) => {
    out += chunk.toString('utf8');
    for (const check of watchers) check();
  });
  child.stderr!.on('data', (chunk: Buffer) => (err += chunk.toString('utf8')));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  let running = true;
  void exited.then(() => {
    running = false;
    for (const check of watchers) check();
  });

  const waitFor = (pattern: RegExp, ms = timeoutMs): Promise<void> =>
    new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => done(new Error(`stdout did not match ${pattern} within ${ms} ms:\n${out}\n${err}`)), ms);
      const done = (e?: Error): void => {
        clearTimeout(timer);
        watchers.delete(check);
        if (e) reject(e);
        else resolve();
      };
      const check = (): void => {
        if (pattern.test(out)) done();
        else if (!running) done(new Error(`the process exited before stdout matched ${pattern}:\n${out}\n${err}`));
      };
      watchers.add(check);
      check();
    });

  const kill = async (): Promise<void> => {
    if (running) {
      child.kill('SIGKILL');
      await exited;
    }
  };

  try {
    await waitFor(/SMTP Mux listening/);
  } catch (e) {
    await kill();
    throw e;
  }
  const line = out.split('\n').find((l) => l.includes('SMTP Mux listening'))!;
  const listening = JSON.parse(line) as { port: number; httpPort?: number };
  const port = Number(listening.port);
  return { child, port, httpPort: listening.httpPort, stdout: () => out, stderr: () => err, exited, waitFor, kill };
}
