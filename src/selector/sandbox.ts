// One selector script in one isolated-vm isolate: load, run per message, and the host's limits.
// The isolate is created at load and reused so module state (a round-robin counter) lives across
// messages, and several messages may be inside it at once. Each deadline protects one thing:
// - every call into the isolate carries isolated-vm's `timeout`: script code that computes for longer
//   than the selector timeout in one go (a loop before or after an await) is stopped, and only then, or
//   when it runs out of memory, is the isolate disposed. The other messages inside it at that moment end
//   as if their script failed (250 if already delivered, else 451); the next run gets a fresh isolate.
// - a run's wall clock: when it passes while the script only waits on the host (a send() in flight),
//   that run alone is abandoned; its delivery latch decides its reply, the isolate carries on.
// A run's budget (sends, log lines and bytes, ctx.state calls) is counted here, on the host side; the
// bootstrap counts it too, only so that a flood never crosses the bridge.
import { readFileSync, promises as fs } from 'node:fs';
import path from 'node:path';
import ivm from 'isolated-vm';
import { SEND_CODES, STATE_CODES } from '../errors';
import { BOUNDS, RUN_CAPS } from './bounds';
import type { StateRecord } from './state';
import type { DownstreamView, MessageSummary, RunHost, SelectorOutcome, SendRecord } from './types';

export interface SandboxLimits {
  /** Wall clock of one run, and the longest one call into the isolate may compute. */
  readonly timeoutMs: number;
  readonly memoryMb: number;
  /** send() calls one run may make (limits.max_sends; the Delivery refuses the extra ones and logs why). */
  readonly maxSends?: number;
}

/** What a sandbox tells its owner, passed in when it is created. */
export interface SandboxEvents {
  /** The isolate was thrown away because a run broke a limit; the next run builds a fresh one. */
  readonly onRestart?: (reason: 'timeout' | 'memory' | 'threw' | 'unavailable') => void;
}

export interface SandboxOptions extends SandboxEvents {
  /**
   * false: the bootstrap forwards every send(), log() and ctx.state call instead of counting them, so a
   * test can show that the host's own counting holds when the isolate's is bypassed.
   */
  readonly isolateCaps?: boolean;
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

/** Reads a selector's source: the one place selector files are read. Throws SelectorLoadError. */
export async function readSelector(file: string): Promise<string> {
  try {
    return await fs.readFile(file, 'utf8');
  } catch (err) {
    throw new SelectorLoadError(file, undefined, `cannot read the selector (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
  }
}

/** The code run in every context before the script: a checked .js file beside this module (src/ or dist/). */
const BOOTSTRAP_FILE = path.join(__dirname, 'bootstrap.js');
let bootstrapSource: string | undefined;

/** What the bootstrap returns (src/selector/bootstrap.js). */
interface BootstrapApi {
  invoke(run: number, message: MessageSummary, downstreams: DownstreamView[]): void;
  settle(id: number, record: SendRecord | StateRecord): void;
  forget(run: number): void;
  bind(select: unknown): boolean;
}

interface Instance {
  readonly isolate: ivm.Isolate;
  readonly invoke: ivm.Reference<BootstrapApi['invoke']>;
  readonly settle: ivm.Reference<BootstrapApi['settle']>;
  readonly forget: ivm.Reference<BootstrapApi['forget']>;
  /** Runs in progress inside this isolate, by the id the isolate knows them by. */
  readonly runs: Map<number, ActiveRun>;
}

interface ActiveRun {
  readonly id: number;
  readonly instance: Instance;
  readonly host: RunHost;
  /** Ends the run with this outcome, once: later calls do nothing. */
  readonly complete: (outcome: SelectorOutcome) => boolean;
  over: boolean;
  /** The isolate told us the run finished (hostDone): it keeps nothing for it but pending answers. */
  returned: boolean;
  /** Host calls (send, ctx.state) started and not yet answered. */
  outstanding: number;
  /** Calls into the isolate made for this run and not yet returned: its script code is running (or queued to). */
  calls: number;
  sends: number;
  stateCalls: number;
  logLines: number;
  logBytes: number;
  logFull: boolean;
}

const MODULE_SYNTAX = /Cannot use import statement outside a module|Unexpected token 'export'|import declarations may only appear/;
const COPY = { arguments: { copy: true } } as const;

export class SelectorSandbox {
  private instance: Promise<Instance> | undefined;
  /** The isolate runs go into now, once built. */
  private live: Instance | undefined;
  private lastRunId = 0;
  private closed = false;
  /** Instances already thrown away, so one overrun is one restart however many runs were inside. */
  private readonly killed = new WeakSet<Instance>();
  /** send() calls that may cross to the host per run: the cap, plus one so the Delivery can refuse it and log why. */
  private readonly crossings: number;

  private constructor(
    readonly file: string,
    readonly source: string,
    readonly limits: SandboxLimits,
    private readonly options: SandboxOptions,
  ) {
    this.crossings = (limits.maxSends ?? 5) + 1;
  }

  /** Reads and compiles a selector; throws SelectorLoadError naming file, line and column. */
  static async load(file: string, limits: SandboxLimits, options: SandboxOptions = {}): Promise<SelectorSandbox> {
    return SelectorSandbox.fromSource(file, await readSelector(file), limits, options);
  }

  static async fromSource(file: string, source: string, limits: SandboxLimits, options: SandboxOptions = {}): Promise<SelectorSandbox> {
    const sandbox = new SelectorSandbox(file, source, limits, options);
    sandbox.instance = sandbox.instantiate();
    await sandbox.instance;
    return sandbox;
  }

  /** Disposes the isolate; runs still inside it end as 'unavailable'. */
  dispose(): void {
    this.closed = true;
    const current = this.instance;
    this.instance = undefined;
    this.live = undefined;
    current?.then((inst) => this.discard(inst, 'unavailable', 'the selector was unloaded while it ran', undefined, false), () => undefined);
  }

  /** Runs select(message, downstreams, ctx) once; never rejects. */
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
    const id = ++this.lastRunId;
    const run: ActiveRun = {
      id,
      instance,
      host,
      over: false,
      returned: false,
      outstanding: 0,
      calls: 0,
      sends: 0,
      stateCalls: 0,
      logLines: 0,
      logBytes: 0,
      logFull: false,
      complete: (outcome) => {
        if (run.over) return false;
        run.over = true;
        instance.runs.delete(id);
        // Answers still due to the isolate will not be delivered: let it drop what waits for them.
        if ((!run.returned || run.outstanding > 0) && !instance.isolate.isDisposed) this.call(instance, instance.forget, [id]);
        finish(outcome);
        return true;
      },
    };
    instance.runs.set(id, run);
    // The wall clock of this message. A run that is only waiting on the host is given up on, and the
    // isolate carries on; a run whose code is still computing has overrun, and the isolate goes.
    const timer = setTimeout(() => {
      const detail = `the selector did not finish within ${timeoutMs} ms`;
      if (run.calls > 0) this.discard(instance, 'timeout', detail, run);
      else run.complete({ kind: 'fault', fault: 'timeout', detail: `${detail} (it was waiting on send() or ctx.state)` });
    }, timeoutMs);
    this.enter(run, instance.invoke, [id, message, downstreams as DownstreamView[]]);
    const outcome = await finished;
    clearTimeout(timer);
    return outcome;
  }

  /** A call into the isolate on behalf of a run: its script code may compute for timeoutMs at most. */
  private enter(run: ActiveRun, ref: ivm.Reference, args: unknown[]): void {
    run.calls++;
    ref.apply(undefined, args, { ...COPY, timeout: this.limits.timeoutMs }).then(
      () => void run.calls--,
      (err: Error) => {
        run.calls--;
        this.broke(run, err);
      },
    );
  }

  /** A call that runs no script code (forget); its failure only means the isolate is gone. */
  private call(instance: Instance, ref: ivm.Reference, args: unknown[]): void {
    ref.apply(undefined, args, { ...COPY, timeout: this.limits.timeoutMs }).catch(() => undefined);
  }

  /** A call into the isolate failed: script code overran its time or memory (the isolate goes), or the isolate is gone. */
  private broke(run: ActiveRun, err: Error): void {
    const message = String(err?.message ?? err);
    const { instance } = run;
    if (this.closed) return void run.complete({ kind: 'fault', fault: 'unavailable', detail: 'the selector was unloaded while it ran' });
    if (/memory limit/i.test(message)) return this.discard(instance, 'memory', `the selector went over its memory limit of ${this.limits.memoryMb} MB`, run);
    if (/timed out/i.test(message)) return this.discard(instance, 'timeout', `the selector computed for longer than ${this.limits.timeoutMs} ms`, run);
    if (instance.isolate.isDisposed) return this.discard(instance, 'unavailable', 'the selector was stopped while it ran', run);
    // The call itself failed (the arguments could not be copied, ...): this run only.
    run.complete({ kind: 'fault', fault: 'unavailable', detail: `the selector could not be called: ${message}` });
  }

  /**
   * Throws an isolate away: `culprit` (if any) ends with the fault, every other run inside ends as
   * unavailable, and the next run builds a fresh isolate from the same source.
   */
  private discard(instance: Instance, fault: 'timeout' | 'memory' | 'unavailable', detail: string, culprit?: ActiveRun, restart = true): void {
    if (restart && !this.closed && !this.killed.has(instance)) {
      this.killed.add(instance);
      this.options.onRestart?.(fault);
    }
    culprit?.complete({ kind: 'fault', fault, detail });
    const others = culprit ? 'the selector was stopped because another message in it broke a limit' : detail;
    for (const run of [...instance.runs.values()]) run.complete({ kind: 'fault', fault: 'unavailable', detail: others });
    if (this.live === instance) {
      this.live = undefined;
      this.instance = undefined;
    }
    disposeIsolate(instance.isolate);
  }

  /** Hands a host answer (send, ctx.state) back to the run that asked, unless that run is over. */
  private answer(run: ActiveRun, id: number, record: SendRecord | StateRecord): void {
    run.outstanding--;
    if (run.over) return;
    this.enter(run, run.instance.settle, [id, record]);
  }

  /** The host side of send(): performs the attempt, then hands the record back into the isolate. */
  private onSend(run: ActiveRun, id: number, target: unknown): void {
    run.outstanding++;
    if (++run.sends > this.crossings) {
      const [code, message] = ['SMTPMUX_SEND_LIMIT', SEND_CODES.SMTPMUX_SEND_LIMIT] as const;
      return this.answer(run, id, { ok: false, downstream: null, code, permanent: false, message, ms: 0 });
    }
    run.host
      .send(typeof target === 'string' ? target.slice(0, BOUNDS.name) : null)
      .catch((err: Error): SendRecord => ({ ok: false, downstream: null, code: 'EUNKNOWN', permanent: false, message: String(err?.message ?? err), ms: 0 }))
      .then((record) => this.answer(run, id, record));
  }

  private onState(run: ActiveRun, id: number, op: unknown, key: unknown, arg: unknown, ttlMs: unknown): void {
    run.outstanding++;
    if (++run.stateCalls > RUN_CAPS.stateCalls) return this.answer(run, id, { ok: false, code: 'SMTPMUX_STATE_LIMIT' });
    if (!run.host.state) return this.answer(run, id, { ok: false, code: 'SMTPMUX_STATE_UNAVAILABLE' });
    run.host.state
      .call(op, key, arg, ttlMs)
      .catch((): StateRecord => ({ ok: false, code: 'SMTPMUX_STATE_UNAVAILABLE' }))
      .then((record) => this.answer(run, id, record));
  }

  /** log() lines and bytes per run, counted here whatever the isolate let through. */
  private onLog(run: ActiveRun, text: unknown): void {
    if (typeof text !== 'string' || run.logFull) return;
    const line = text.slice(0, BOUNDS.text);
    const bytes = Buffer.byteLength(line);
    if (run.logLines >= RUN_CAPS.logLines || run.logBytes + bytes > RUN_CAPS.logBytes) {
      run.logFull = true;
      return run.host.log(`(log limit reached: ${RUN_CAPS.logLines} lines or ${RUN_CAPS.logBytes} bytes per message; further lines dropped)`);
    }
    run.logLines++;
    run.logBytes += bytes;
    run.host.log(line);
  }

  private onDone(run: ActiveRun, record: unknown): void {
    run.returned = true;
    run.complete(this.outcomeOf(record));
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

  private async instantiate(): Promise<Instance> {
    const isolate = new ivm.Isolate({ memoryLimit: this.limits.memoryMb });
    const timeout = this.limits.timeoutMs;
    try {
      const context = await isolate.createContext();
      let instance: Instance | undefined;
      // What the isolate calls, each with the id of the run it is for. A run that is over gets nothing;
      // when it still asked for an answer, the isolate is told to drop what waits for it.
      const on =
        <A extends unknown[]>(handle: (run: ActiveRun, ...args: A) => void, answered: boolean) =>
        (runId: unknown, ...args: A): void => {
          if (!instance || typeof runId !== 'number') return;
          const run = instance.runs.get(runId);
          if (run) handle(run, ...args);
          else if (answered) this.call(instance, instance.forget, [runId]);
        };
      const hostSend = new ivm.Reference(on((run, id: number, target: unknown) => this.onSend(run, id, target), true));
      const hostState = new ivm.Reference(on((run, id: number, op: unknown, key: unknown, arg: unknown, ttl: unknown) => this.onState(run, id, op, key, arg, ttl), true));
      const hostLog = new ivm.Reference(on((run, text: unknown) => this.onLog(run, text), false));
      const hostDone = new ivm.Reference(on((run, record: unknown) => this.onDone(run, record), false));
      const config = {
        bounds: BOUNDS,
        codes: { ...SEND_CODES, ...STATE_CODES },
        caps: this.options.isolateCaps === false ? null : { sends: this.crossings, logs: RUN_CAPS.logLines, stateCalls: RUN_CAPS.stateCalls },
      };
      bootstrapSource ??= readFileSync(BOOTSTRAP_FILE, 'utf8');
      const boot = await (await isolate.compileScript(bootstrapSource, { filename: 'smtpmux-bootstrap.js' })).run(context, { reference: true, timeout });
      const api = (await boot.apply(undefined, [hostSend, hostState, hostLog, hostDone, new ivm.ExternalCopy(config).copyInto()], {
        result: { reference: true },
        timeout,
      })) as ivm.Reference<BootstrapApi>;
      const built: Instance = {
        isolate,
        runs: new Map(),
        invoke: await api.get('invoke', { reference: true }),
        settle: await api.get('settle', { reference: true }),
        forget: await api.get('forget', { reference: true }),
      };
      instance = built;
      const bind = await api.get('bind', { reference: true });
      const select = await this.compile(isolate, context);
      const ok = await bind.apply(undefined, [select.derefInto()], { timeout });
      if (!ok) {
        throw new SelectorLoadError(
          this.file,
          undefined,
          'defines no select function: declare `function select(message, downstreams, ctx) { ... }` or `export default function select(message, downstreams, ctx) { ... }`',
        );
      }
      this.live = built;
      return built;
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

/** The first stack frame inside the selector's own file, as file:line:col (for error messages only). */
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
