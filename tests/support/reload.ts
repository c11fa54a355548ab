// Helpers for the hot-reload tests: an App started on a config folder the test lays out itself
// (symlinks included, as a Kubernetes ConfigMap mount has them), a downstream whose accepted passwords
// can change while it runs, bounded waits on the captured log, and file edits the way editors and
// kubelet make them.
import { mkdirSync, mkdtempSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { SMTPServer } from 'smtp-server';
import { App } from '../../src/app';
import type { WatchOptions } from '../../src/config/watch';
import { createLogger } from '../../src/observe/logger';
import { listenOnLoopback, subjectOf } from './downstream';

export type LogLine = Record<string, unknown> & { msg?: string; level?: number; time?: string };

export interface WatchedProxy {
  readonly app: App;
  readonly port: number;
  readonly dir: string;
  readonly logs: LogLine[];
  /** What each look of the watcher found, in order. */
  readonly checks: readonly ('changed' | 'unchanged')[];
  /**
   * Makes the watcher look once more (a file event in the folder) and resolves with what that look
   * found: the way to show that nothing (more) happened without sleeping.
   */
  nextCheck(): Promise<'changed' | 'unchanged'>;
  stop(): Promise<void>;
}

export function tempDir(prefix = 'smtpmux-reload-'): string {
  return mkdtempSync(path.join(os.tmpdir(), prefix));
}

/**
 * Starts an App on `<dir>/config.yaml` (the caller lays out the folder first) with its log captured,
 * and the App's own watcher (with short test timings) unless `watch` is false. No SMTPMUX_PORT override: the config's listen.port is used.
 */
export async function startWatched(
  dir: string,
  options: {
    watch?: WatchOptions | false;
    env?: Record<string, string>;
    /** Called with each log line as it is written, synchronously, inside the log call. */
    onLog?: (line: LogLine) => void;
  } = {},
): Promise<WatchedProxy> {
  const logs: LogLine[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const text of chunk.toString('utf8').split('\n')) {
        if (!text.trim()) continue;
        const line = JSON.parse(text) as LogLine;
        logs.push(line);
        options.onLog?.(line);
      }
      done();
    },
  });
  // Spilled bodies go elsewhere: files appearing in the config folder are events the watcher sees.
  const spill = tempDir('smtpmux-spill-');
  const checks: ('changed' | 'unchanged')[] = [];
  const watch = options.watch === false ? undefined : options.watch;
  const app = await App.start({
    configPath: path.join(dir, 'config.yaml'),
    // The admin listener on a port the OS picks, never the default another test may hold.
    env: { SMTPMUX_HTTP_PORT: '0', ...(options.env ?? {}) },
    logger: createLogger({ level: 'debug', destination }),
    tmpDir: spill,
    shutdownGraceMs: 5000,
    watch:
      options.watch === false
        ? false
        : {
            debounceMs: 100,
            pollMs: 500,
            missingGraceMs: 300,
            ...watch,
            onCheck: (outcome) => {
              checks.push(outcome);
              watch?.onCheck?.(outcome);
            },
          },
  });
  let probes = 0;
  return {
    app,
    port: app.port,
    dir,
    logs,
    checks,
    async nextCheck() {
      const seen = checks.length;
      // Not a watched file: its event only makes the watcher look at the ones it watches.
      writeFileSync(path.join(dir, `.probe-${++probes}`), '');
      await until(() => checks.length > seen, 'the watcher to look after a probe event');
      return checks[seen];
    },
    async stop() {
      await app.close();
      rmSync(dir, { recursive: true, force: true });
      rmSync(spill, { recursive: true, force: true });
    },
  };
}

export const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls until `predicate` holds, every 20 ms, for at most `timeoutMs`; throws with `what` otherwise. */
export async function until(predicate: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(20);
  }
}

export const isReloaded = (l: LogLine): boolean => l.msg === 'reloaded';
export const isReloadFailed = (l: LogLine): boolean => typeof l.msg === 'string' && l.msg.startsWith('reload failed');
export const isReloadOutcome = (l: LogLine): boolean => isReloaded(l) || isReloadFailed(l);

/** Waits for the first log line at index >= `from` matching `match`, and returns it with its index. */
export async function waitForLog(logs: LogLine[], from: number, match: (l: LogLine) => boolean, what: string, timeoutMs = 10_000): Promise<{ line: LogLine; index: number }> {
  let found = -1;
  await until(
    () => {
      for (let i = from; i < logs.length; i++) {
        if (match(logs[i])) {
          found = i;
          return true;
        }
      }
      return false;
    },
    `${what} (log since: ${JSON.stringify(logs.slice(from).map((l) => l.msg))})`,
    timeoutMs,
  );
  return { line: logs[found], index: found };
}

/** Log time in ms since the epoch (the logger writes ISO times). */
export const logTime = (l: LogLine): number => Date.parse(String(l.time));

/** Replaces a file the way most editors save: write a temp file beside it, then rename it over. */
export function renameOver(file: string, text: string): void {
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  writeFileSync(tmp, text);
  renameSync(tmp, file);
}

/**
 * A folder laid out as kubelet mounts a ConfigMap: every key is a symlink `<key> -> ..data/<key>`,
 * `..data` is a symlink to a timestamped folder, and an update writes a new timestamped folder, points
 * a temp symlink at it and renames that over `..data` (one atomic switch).
 */
export class ConfigMapDir {
  private generation = 0;
  private current = '';
  constructor(readonly dir: string) {}

  /** Writes the first version and the key symlinks. */
  init(files: Record<string, string>, stamp = '..2026_01_01_a'): void {
    this.writeVersion(stamp, files);
    this.current = stamp;
    symlinkSync(stamp, path.join(this.dir, '..data'));
    for (const key of Object.keys(files)) symlinkSync(path.join('..data', key), path.join(this.dir, key));
  }

  /**
   * Publishes a new version: new folder, temp symlink, rename over ..data; then, as kubelet does, the
   * old folder is removed and keys new in this version get their symlink.
   */
  swap(files: Record<string, string>, stamp: string): void {
    this.writeVersion(stamp, files);
    const tmpLink = path.join(this.dir, `..data_tmp${++this.generation}`);
    symlinkSync(stamp, tmpLink);
    renameSync(tmpLink, path.join(this.dir, '..data'));
    rmSync(path.join(this.dir, this.current), { recursive: true, force: true });
    this.current = stamp;
    for (const key of Object.keys(files)) {
      try {
        symlinkSync(path.join('..data', key), path.join(this.dir, key));
      } catch {
        // the key's symlink exists already
      }
    }
  }

  private writeVersion(stamp: string, files: Record<string, string>): void {
    const folder = path.join(this.dir, stamp);
    mkdirSync(folder);
    for (const [key, text] of Object.entries(files)) writeFileSync(path.join(folder, key), text);
  }
}

export interface AuthReceived {
  readonly subject: string;
  readonly user?: string;
  readonly pass?: string;
  readonly at: number;
}

export interface AuthDownstream {
  readonly port: number;
  readonly addr: string;
  readonly received: AuthReceived[];
  connections(): number;
  authFailures(): number;
  /** The passwords accepted from now on (for new AUTH commands). */
  accept(passwords: string[]): void;
  close(): Promise<void>;
}

/** A downstream requiring AUTH whose accepted passwords the test can change, as when credentials rotate. */
export async function startAuthDownstream(user: string, passwords: string[]): Promise<AuthDownstream> {
  let accepted = new Set(passwords);
  const received: AuthReceived[] = [];
  let connections = 0;
  let failures = 0;
  const server = new SMTPServer({
    authOptional: false,
    allowInsecureAuth: true,
    disabledCommands: ['STARTTLS'],
    logger: false,
    onConnect(_session, callback) {
      connections++;
      callback();
    },
    onAuth(auth, _session, callback) {
      if (auth.username === user && accepted.has(auth.password ?? '')) return callback(null, { user: `${auth.username}\0${auth.password}` });
      failures++;
      callback(Object.assign(new Error('Invalid username or password'), { responseCode: 535 }));
    },
    onData(stream, session, callback) {
      const chunks: Buffer[] = [];
      stream.on('data', (c: Buffer) => chunks.push(c));
      stream.on('end', () => {
        const [u, p] = String(session.user ?? '').split('\0');
        received.push({ subject: subjectOf(Buffer.concat(chunks)), user: u, pass: p, at: Date.now() });
        callback(null, 'Queued');
      });
    },
  });
  return {
    ...(await listenOnLoopback(server)),
    received,
    connections: () => connections,
    authFailures: () => failures,
    accept(next) {
      accepted = new Set(next);
    },
  };
}

/** A selector that sends every message to one named downstream (so the version that served is visible). */
export function fixedSelector(target: string, note = ''): string {
  return `// ${note || `routes everything to ${target}`}\nfunction select(message, downstreams) {\n  return [${JSON.stringify(target)}];\n}\n`;
}

/** Writes `text` to `<dir>/<name>`, creating folders. */
export function writeIn(dir: string, name: string, text: string): string {
  const file = path.join(dir, name);
  mkdirSync(path.dirname(file), { recursive: true });
  writeFileSync(file, text);
  return file;
}

export interface SlowDownstream {
  readonly port: number;
  readonly addr: string;
  /** Subjects of the messages whose DATA arrived (each is answered only after the stall). */
  readonly seen: string[];
  connections(): number;
  /** Answers every message held so far, and from now on answers at once. */
  release(): void;
  close(): Promise<void>;
}

/**
 * A downstream that takes the whole message, stalls `ms`, then answers with `code` (451 by default): a
 * slow, failing server. With `ms` Infinity it holds each answer until release(): a test then decides
 * when the slow part ends instead of betting on a clock.
 */
export async function startSlowDownstream(ms: number, code = 451): Promise<SlowDownstream> {
  const seen: string[] = [];
  let connections = 0;
  const timers = new Set<NodeJS.Timeout>();
  const held = new Set<() => void>();
  let released = false;
  const server = new SMTPServer({
    authOptional: true,
    allowInsecureAuth: true,
    disabledCommands: ['STARTTLS'],
    logger: false,
    onConnect(_session, callback) {
      connections++;
      callback();
    },
    onData(stream, _session, callback) {
      const chunks: Buffer[] = [];
      stream.on('data', (c: Buffer) => chunks.push(c));
      stream.on('end', () => {
        seen.push(subjectOf(Buffer.concat(chunks)));
        const answer = (): void => {
          if (code === 250) callback(null, 'Queued after a while');
          else callback(Object.assign(new Error(`${code >= 500 ? '5' : '4'}.3.0 Slow and unwilling`), { responseCode: code }));
        };
        if (released) return answer();
        if (ms === Infinity) {
          held.add(answer);
          return;
        }
        const timer = setTimeout(() => {
          timers.delete(timer);
          answer();
        }, ms);
        timers.add(timer);
      });
    },
  });
  const listening = await listenOnLoopback(server);
  return {
    port: listening.port,
    addr: listening.addr,
    seen,
    connections: () => connections,
    release() {
      released = true;
      for (const answer of held) answer();
      held.clear();
    },
    close: () => {
      for (const timer of timers) clearTimeout(timer);
      return listening.close();
    },
  };
}
