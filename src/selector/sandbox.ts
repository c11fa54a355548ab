// One selector script in one isolated-vm isolate: load, run per message, and the host's limits.
// The isolate is created at load and reused so module state (a round-robin counter) lives across
// messages, and several messages may be inside it at once. A run that overruns its deadline or memory
// disposes it: the other messages inside it at that moment end as if their script failed (250 if
// already delivered, else 451), and the next run gets a fresh isolate built from the same source.
import { promises as fs } from 'node:fs';
import ivm from 'isolated-vm';
import { BOOTSTRAP_SOURCE, BOUNDS } from './bootstrap';
import type { DownstreamView, MessageSummary, RunHost, SelectorOutcome, SendRecord } from './types';

export interface SandboxLimits {
  readonly timeoutMs: number;
  readonly memoryMb: number;
  /** log() lines one run may write. */
  readonly logLines?: number;
  /** send() calls one run may make; past one more, the isolate refuses them itself. */
  readonly maxSends?: number;
}

/** What a sandbox tells its owner, passed in when it is created. */
export interface SandboxEvents {
  /** The isolate was thrown away because a run broke a limit; the next run builds a fresh one. */
  readonly onRestart?: (reason: 'timeout' | 'memory' | 'threw' | 'unavailable') => void;
}

/** A selector that cannot be loaded: its file, where in it (file:line:col) and what is wrong. */
export class SelectorLoadError extends Error {
  constructor(
    readonly file: string,
    readonly location: string | undefined,
    readonly reason: string,
  ) {
    super(`${location ?? file}: ${reason}`);
    this.name = 'SelectorLoadError';
  }
}

interface Instance {
  readonly isolate: ivm.Isolate;
  readonly settle: ivm.Reference<(id: number, record: SendRecord) => void>;
  readonly invoke: ivm.Reference<(run: number, message: MessageSummary, downstreams: DownstreamView[], logLines: number, maxSends: number) => Promise<unknown>>;
}

interface ActiveRun {
  readonly instance: Instance;
  readonly host: RunHost;
  readonly deadline: number;
  /** Ends the run with this outcome, once: later calls do nothing. */
  readonly complete: (outcome: SelectorOutcome) => boolean;
  over: boolean;
  sends: number;
}

const MODULE_SYNTAX = /Cannot use import statement outside a module|Unexpected token 'export'|import declarations may only appear/;

export class SelectorSandbox {
  private instance: Promise<Instance> | undefined;
  /** Runs in progress, by the id the isolate knows them by. */
  private readonly active = new Map<number, ActiveRun>();
  private lastRunId = 0;
  private closed = false;
  /** send() calls that may cross to the host per run: the limit, plus one so the host can refuse it and log why. */
  private readonly sendsPerRun: number;
  /** Instances already thrown away, so one overrun is one restart however many runs were inside. */
  private readonly killed = new WeakSet<Instance>();

  private constructor(
    readonly file: string,
    readonly source: string,
    readonly limits: SandboxLimits,
    private readonly events: SandboxEvents,
  ) {
    this.sendsPerRun = (limits.maxSends ?? 5) + 1;
  }

  /** Reads and compiles a selector; throws SelectorLoadError naming file, line and column. */
  static async load(file: string, limits: SandboxLimits, events: SandboxEvents = {}): Promise<SelectorSandbox> {
    let source: string;
    try {
      source = await fs.readFile(file, 'utf8');
    } catch (err) {
      throw new SelectorLoadError(file, undefined, `cannot read the selector (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
    }
    return SelectorSandbox.fromSource(file, source, limits, events);
  }

  static async fromSource(file: string, source: string, limits: SandboxLimits, events: SandboxEvents = {}): Promise<SelectorSandbox> {
    const sandbox = new SelectorSandbox(file, source, limits, events);
    sandbox.instance = sandbox.instantiate();
    await sandbox.instance;
    return sandbox;
  }

  /** Disposes the isolate; runs still inside it end as 'unavailable'. */
  dispose(): void {
    this.closed = true;
    const current = this.instance;
    this.instance = undefined;
    current?.then((inst) => disposeIsolate(inst.isolate), () => undefined);
  }

  /** Runs select(message, downstreams) once; never rejects. */
  async run(message: MessageSummary, downstreams: readonly DownstreamView[], host: RunHost): Promise<SelectorOutcome> {
    if (this.closed) return { kind: 'fault', fault: 'unavailable', detail: 'the selector was unloaded' };
    let instance: Instance;
    try {
      this.instance ??= this.instantiate();
      instance = await this.instance;
    } catch (err) {
      this.instance = undefined;
      return { kind: 'fault', fault: 'unavailable', detail: `the selector could not be rebuilt: ${(err as Error).message}` };
    }
    const { timeoutMs } = this.limits;
    let finish!: (outcome: SelectorOutcome) => void;
    const finished = new Promise<SelectorOutcome>((resolve) => (finish = resolve));
    const run: ActiveRun = {
      instance,
      host,
      deadline: Date.now() + timeoutMs,
      over: false,
      sends: 0,
      complete: (outcome) => {
        if (run.over) return false;
        run.over = true;
        finish(outcome);
        return true;
      },
    };
    const runId = ++this.lastRunId;
    this.active.set(runId, run);
    // isolated-vm's own timeout does not reach code that runs after an await: the host's clock does.
    const timer = setTimeout(() => this.kill(run, 'timeout', `the selector did not finish within ${timeoutMs} ms`), timeoutMs);
    instance.invoke
      .apply(undefined, [runId, message, downstreams as DownstreamView[], this.limits.logLines ?? 50, this.sendsPerRun], {
        arguments: { copy: true },
        result: { promise: true, copy: true },
        timeout: timeoutMs,
      })
      .then(
        (record: unknown) => run.complete(this.outcomeOf(record)),
        (err: Error) => this.kill(run, ...this.faultOf(run, err)),
      );
    const outcome = await finished;
    clearTimeout(timer);
    this.active.delete(runId);
    return outcome;
  }

  /** Ends a run that broke a limit and throws its isolate away; the next run builds a fresh one. */
  private kill(run: ActiveRun, fault: 'timeout' | 'memory' | 'threw' | 'unavailable', detail: string): void {
    if (!run.complete({ kind: 'fault', fault, detail })) return;
    if (!this.closed && !this.killed.has(run.instance)) {
      this.killed.add(run.instance);
      this.events.onRestart?.(fault);
    }
    if (this.instance) {
      const stale = this.instance;
      this.instance = undefined;
      stale.then((inst) => inst === run.instance && disposeIsolate(inst.isolate), () => undefined);
    }
    disposeIsolate(run.instance.isolate);
  }

  private faultOf(run: ActiveRun, err: Error): ['timeout' | 'memory' | 'threw' | 'unavailable', string] {
    const message = String(err?.message ?? err);
    if (this.closed) return ['unavailable', 'the selector was unloaded while it ran'];
    if (/memory limit/i.test(message)) return ['memory', `the selector went over its memory limit of ${this.limits.memoryMb} MB`];
    if (/timed out/i.test(message)) return ['timeout', `the selector did not finish within ${this.limits.timeoutMs} ms`];
    if (run.instance.isolate.isDisposed) {
      // Killed for another message's overrun, while this one was inside the same isolate.
      return Date.now() < run.deadline
        ? ['unavailable', 'the selector was stopped because another message in it broke a limit']
        : ['timeout', `the selector did not finish within ${this.limits.timeoutMs} ms`];
    }
    return ['threw', message];
  }

  /**
   * What the isolate returned, checked again on this side: the bootstrap bounds and shapes it, but a
   * script that broke the bootstrap's assumptions must cost its message a 451, never the process.
   */
  private outcomeOf(value: unknown): SelectorOutcome {
    const unexpected: SelectorOutcome = { kind: 'fault', fault: 'bad-result', detail: 'the selector returned something unexpected' };
    if (value === null || typeof value !== 'object') return unexpected;
    const record = value as Partial<Record<string, unknown>>;
    const text = (field: unknown, max: number = BOUNDS.text): string => (typeof field === 'string' ? field.slice(0, max) : '');
    switch (record.kind) {
      case 'none':
        return { kind: 'none' };
      case 'order': {
        const targets = record.targets;
        if (!Array.isArray(targets) || targets.length > BOUNDS.targets || !targets.every((t) => typeof t === 'string')) return unexpected;
        return { kind: 'order', targets: targets.map((t: string) => t.slice(0, BOUNDS.name)) };
      }
      case 'reason':
        return { kind: 'reason', reason: text(record.reason) };
      case 'bad':
        return { kind: 'fault', fault: 'bad-result', detail: text(record.detail) };
      case 'threw': {
        const location = locate(text(record.stack), this.file);
        // A SendError the script let through is the send's own failure: the attempts decide the reply.
        if (record.sendError === true) return { kind: 'reason', reason: text(record.message), location };
        return { kind: 'fault', fault: 'threw', detail: `${text(record.name, BOUNDS.name)}: ${text(record.message)}`, location };
      }
      default:
        return unexpected;
    }
  }

  /** The host side of send(): performs the attempt, then hands the record back into the isolate. */
  private onSend(instance: Instance, runId: number, id: number, target: unknown): void {
    const run = this.active.get(runId);
    if (!run || run.over || run.instance !== instance) return;
    // The isolate lets one call past the cap cross (the host refuses it and logs the limit) and refuses
    // the rest itself; this guards the host if that were ever bypassed.
    if (++run.sends > this.sendsPerRun) return;
    const sent = run.host.send(typeof target === 'string' ? target : null).catch(
      (err: Error): SendRecord => ({ ok: false, downstream: null, code: 'EUNKNOWN', permanent: false, message: String(err?.message ?? err), ms: 0 }),
    );
    sent.then((record) => {
      if (run.over) return;
      const timeout = Math.max(1, run.deadline - Date.now());
      // The continuation after `await send()` runs inside this apply, so its timeout bounds that code too.
      instance.settle.apply(undefined, [id, record], { arguments: { copy: true }, timeout }).catch((err: Error) => this.kill(run, ...this.faultOf(run, err)));
    });
  }

  private async instantiate(): Promise<Instance> {
    const isolate = new ivm.Isolate({ memoryLimit: this.limits.memoryMb });
    try {
      const context = await isolate.createContext();
      let instance: Instance | undefined;
      const hostSend = new ivm.Reference((runId: number, id: number, target: unknown) => instance && this.onSend(instance, runId, id, target));
      const hostLog = new ivm.Reference((runId: number, text: unknown) => {
        const run = this.active.get(runId);
        if (run && run.instance === instance && typeof text === 'string') run.host.log(text.slice(0, BOUNDS.text));
      });
      const api = await context.evalClosure(BOOTSTRAP_SOURCE, [hostSend, hostLog], { result: { reference: true } });
      const bind = await api.get('bind', { reference: true });
      instance = {
        isolate,
        settle: await api.get('settle', { reference: true }),
        invoke: await api.get('invoke', { reference: true }),
      };
      const select = await this.compile(isolate, context);
      const ok = await bind.apply(undefined, [select.derefInto()], { timeout: this.limits.timeoutMs });
      if (!ok) {
        throw new SelectorLoadError(
          this.file,
          undefined,
          'defines no select function: declare `function select(message, downstreams) { ... }` or `export default function select(message, downstreams) { ... }`',
        );
      }
      return instance;
    } catch (err) {
      disposeIsolate(isolate);
      throw err instanceof SelectorLoadError ? err : this.loadError(err as Error);
    }
  }

  /** Compiles the user's code as a classic script, or as an ES module when it uses import/export. */
  private async compile(isolate: ivm.Isolate, context: ivm.Context): Promise<ivm.Reference> {
    const timeout = this.limits.timeoutMs;
    try {
      const script = await isolate.compileScript(this.source, { filename: this.file });
      await script.run(context, { timeout });
      // With a timeout: `select` may be a getter on the global that never returns.
      return await context.evalClosure('return typeof select === "function" ? select : undefined', [], { result: { reference: true }, timeout });
    } catch (err) {
      // By name, not instanceof: isolated-vm builds the error in the realm that loaded it, which is not
      // always this module's (Jest runs tests in a vm context, where `instanceof SyntaxError` is false).
      if ((err as Error)?.name !== 'SyntaxError' || !MODULE_SYNTAX.test(String((err as Error).message))) throw err;
    }
    const mod = await isolate.compileModule(this.source, { filename: this.file });
    await mod.instantiate(context, (specifier) => {
      throw new Error(`selectors cannot import modules ("${specifier}"): everything a selector needs is passed to select()`);
    });
    await mod.evaluate({ timeout });
    const fallback = await mod.namespace.get('default', { reference: true });
    return fallback.typeof === 'function' ? fallback : mod.namespace.get('select', { reference: true });
  }

  private loadError(err: Error): SelectorLoadError {
    const message = String(err?.message ?? err);
    if (/memory limit/i.test(message)) return new SelectorLoadError(this.file, undefined, `ran out of memory while loading (limit ${this.limits.memoryMb} MB)`);
    if (/timed out/i.test(message)) return new SelectorLoadError(this.file, undefined, `did not finish loading within ${this.limits.timeoutMs} ms`);
    // Syntax errors carry "[file:line:col]" in the message; runtime errors carry it in the stack.
    const bracket = /^(.*) \[(.+):(\d+):(\d+)\]$/.exec(message);
    if (bracket) return new SelectorLoadError(this.file, `${this.file}:${bracket[3]}:${bracket[4]}`, `${err.name}: ${bracket[1]}`);
    return new SelectorLoadError(this.file, locate(String(err?.stack ?? ''), this.file), `${err?.name ?? 'Error'}: ${message}`);
  }
}

/** The first stack frame inside the selector's own file, as file:line:col. */
export function locate(stack: string, file: string): string | undefined {
  for (const line of stack.split('\n')) {
    const at = line.lastIndexOf(`${file}:`);
    if (at < 0) continue;
    const match = /^:(\d+):(\d+)/.exec(line.slice(at + file.length));
    if (match) return `${file}:${match[1]}:${match[2]}`;
  }
  return undefined;
}

function disposeIsolate(isolate: ivm.Isolate): void {
  if (!isolate.isDisposed) {
    try {
      isolate.dispose();
    } catch {
      // already disposed by V8 after a memory overrun
    }
  }
}
