// Hot reload's eyes: watches a set of files and calls back when their content changes; the callback
// (the App's reload) answers with the files to watch from then on. It knows nothing of what the files
// mean, so it imports nothing of the app. It watches the folders, not the files, because editors
// replace a file by renaming a temp file over it and Kubernetes swaps a `..data` symlink: a watch on the
// old inode would see neither. What triggers a callback is a change of content (a fingerprint of every
// watched file), so a burst of events for one save is one reload, and a poll catches what inotify
// misses (some bind mounts).
import { createHash } from 'node:crypto';
import { watch, promises as fs, type FSWatcher } from 'node:fs';
import path from 'node:path';

export interface WatchOptions {
  /** Quiet time after the last event before looking (an editor's save is several events). */
  readonly debounceMs?: number;
  /** Fallback poll for file systems that do not report changes. */
  readonly pollMs?: number;
  /** How long a watched file may be missing (mid-rename) before the reload goes ahead without it. */
  readonly missingGraceMs?: number;
  /**
   * Told after each look at the files: `changed` once the callback for a change has returned,
   * `unchanged` when the content was what it was. Lets a caller wait for the watcher to have looked,
   * instead of sleeping.
   */
  readonly onCheck?: (outcome: 'changed' | 'unchanged') => void;
}

async function fingerprint(files: readonly string[]): Promise<{ print: string; missing: string[] }> {
  const hash = createHash('sha256');
  const missing: string[] = [];
  for (const file of files) {
    hash.update(file).update('\0');
    try {
      hash.update(await fs.readFile(file));
    } catch {
      missing.push(file);
      hash.update('\0missing\0');
    }
  }
  return { print: hash.digest('hex'), missing };
}

/**
 * Called when the watched content changed (`reason` says how); resolves with the files to watch from
 * now on (a reload may name new selectors).
 */
export type OnChange = (reason: string) => Promise<readonly string[]>;

export class FileWatcher {
  private watchers = new Map<string, FSWatcher>();
  private files: readonly string[] = [];
  private lastPrint = '';
  private timer: NodeJS.Timeout | undefined;
  private poller: NodeJS.Timeout | undefined;
  private checking: Promise<void> = Promise.resolve();
  private missingSince: number | undefined;
  private stopped = false;
  /** File-system events seen so far: tells a check whether something changed while it ran. */
  private events = 0;

  constructor(
    initialFiles: readonly string[],
    private readonly onChange: OnChange,
    private readonly options: WatchOptions = {},
  ) {
    this.files = [...initialFiles];
  }

  async start(): Promise<void> {
    this.lastPrint = (await fingerprint(this.files)).print;
    this.arm();
    this.poller = setInterval(() => this.schedule(0), this.options.pollMs ?? 2000);
    this.poller.unref();
  }

  /** Stops watching; resolves when a check that was running (and its callback) has finished. */
  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.timer);
    clearInterval(this.poller);
    for (const watcher of this.watchers.values()) watcher.close();
    this.watchers.clear();
    await this.checking;
  }

  /** Watches the folder of every watched file; folders no longer needed are let go. */
  private arm(): void {
    const dirs = new Set(this.files.map((f) => path.dirname(f)));
    for (const [dir, watcher] of this.watchers) {
      if (!dirs.has(dir)) {
        watcher.close();
        this.watchers.delete(dir);
      }
    }
    for (const dir of dirs) {
      if (this.watchers.has(dir)) continue;
      try {
        const watcher = watch(dir, { persistent: false }, () => {
          this.events++;
          this.schedule(this.options.debounceMs ?? 200);
        });
        watcher.on('error', () => {
          watcher.close();
          this.watchers.delete(dir);
        });
        this.watchers.set(dir, watcher);
      } catch {
        // The folder is gone for now; the poll notices when it is back.
      }
    }
  }

  private schedule(delayMs: number): void {
    if (this.stopped) return;
    if (delayMs === 0 && this.timer) return; // an event-driven check is already pending
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.checking = this.checking.then(() => this.check());
    }, delayMs);
    this.timer.unref();
  }

  private async check(): Promise<void> {
    if (this.stopped) return;
    const { print, missing } = await fingerprint(this.files);
    if (print === this.lastPrint) {
      this.missingSince = undefined;
      this.options.onCheck?.('unchanged');
      return;
    }
    const grace = this.options.missingGraceMs ?? 1000;
    if (missing.length > 0) {
      // Mid-rename, a file is briefly absent: give it a moment before deciding it was deleted.
      this.missingSince ??= Date.now();
      if (Date.now() - this.missingSince < grace) return this.schedule(Math.min(250, grace));
    }
    this.missingSince = undefined;
    this.lastPrint = print;
    const eventsBefore = this.events;
    const files = await this.onChange(missing.length > 0 ? `file missing: ${missing.join(', ')}` : 'file changed');
    if (this.stopped) return;
    // The files to watch may have changed: new selectors, or the ones a failed config names.
    if (files.join('\0') !== this.files.join('\0')) {
      const before = this.files;
      this.files = files;
      this.arm();
      const [fresh, again] = await Promise.all([fingerprint(files), fingerprint(before)]);
      // A save that landed while the reload ran may not be in what it read, and taking the new files'
      // fingerprint now would hide it: when a file changed or an event came in meanwhile, leave the
      // fingerprint unknown so the next check reloads once more.
      const changedMeanwhile = again.print !== print || this.events !== eventsBefore;
      this.lastPrint = changedMeanwhile ? '' : fresh.print;
      if (changedMeanwhile) this.schedule(this.options.debounceMs ?? 200);
    }
    this.options.onCheck?.('changed');
  }
}
