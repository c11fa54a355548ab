// Starts SMTP Mux in this process on a port the OS picks, from a config written to a temp folder,
// with its log lines captured so tests can read them.
import { mkdtempSync, writeFileSync, rmSync, mkdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import type { WatchOptions } from '../../src/config/watch';
import { App } from '../../src/app';
import { createLogger } from '../../src/observe/logger';

export interface RunningProxy {
  readonly app: App;
  readonly port: number;
  /** The admin HTTP listener's port; undefined when the config says `http: false`. */
  readonly httpPort: number | undefined;
  readonly dir: string;
  /** Parsed log lines so far. */
  readonly logs: Record<string, unknown>[];
  /** Raw log text so far. */
  logText(): string;
  write(name: string, text: string): string;
  stop(): Promise<void>;
}

/** `watch`: the App's own file watcher with these options (default: off, tests reload by hand). */
export async function startProxy(files: Record<string, string>, options: { env?: Record<string, string>; watch?: WatchOptions } = {}): Promise<RunningProxy> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'smtpmux-test-'));
  const write = (name: string, text: string): string => {
    const file = path.join(dir, name);
    mkdirSync(path.dirname(file), { recursive: true });
    writeFileSync(file, text);
    return file;
  };
  for (const [name, text] of Object.entries(files)) write(name, text);
  const chunks: string[] = [];
  const logs: Record<string, unknown>[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, done) {
      const text = chunk.toString('utf8');
      chunks.push(text);
      for (const line of text.split('\n')) if (line.trim()) logs.push(JSON.parse(line));
      done();
    },
  });
  const logger = createLogger({ level: 'debug', destination });
  const app = await App.start({
    configPath: path.join(dir, 'config.yaml'),
    // Both listeners on ports the OS picks: never the default 9587 another test or process may hold.
    env: { SMTPMUX_PORT: '0', SMTPMUX_HTTP_PORT: '0', ...options.env },
    logger,
    tmpDir: dir,
    shutdownGraceMs: 5000,
    watch: options.watch ?? false,
  });
  return {
    app,
    port: app.port,
    httpPort: app.adminPort,
    dir,
    logs,
    logText: () => chunks.join(''),
    write,
    async stop() {
      await app.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
