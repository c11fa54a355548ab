// @ts-check
// The code compiled into every selector context before the user's script: the ctx object of each run
// (send, log, state), the global send()/log() aliases, and the invoke() trampoline that freezes the
// inputs and turns any result into a plain record. sandbox.ts is its only reader: it compiles this file
// as a script whose value is the function below, and calls it once per isolate with the host's
// References and the bounds, caps and error texts (so nothing here is a copy of a host-side table).
//
// It talks to the host only through four References, fire-and-forget (applyIgnored): hostSend,
// hostState, hostLog, hostDone. Answers come back through settle(), which the host calls with a plain
// copy. Promise rejections never cross.
//
// Which message a call belongs to is explicit: ctx.send/ctx.log/ctx.state carry the run id they were
// made with. The global send()/log() use the run whose host call (invoke or settle) is executing:
// isolated-vm drains the microtask queue inside each call, so all script code that runs belongs to the
// call that entered. Nothing is inferred from stack traces.
//
// The user's script runs after this and may replace any built-in (String, Array.prototype.map,
// Object.prototype.then, Error.prepareStackTrace...). So everything here is strict mode (a CallSite
// gives a script no handle on these functions), uses built-ins captured before the script ran, returns
// records without a prototype (a hooked `then` cannot intercept them), and bounds every string and list
// it hands out; the host checks all of it again.
(
  /**
   * @typedef {{ applyIgnored(receiver: undefined, args: unknown[], options?: object): void }} HostRef
   * @typedef {{ text: number, targets: number, name: number, logArgs: number, stateKey: number, stateValue: number, ttlMs: number }} Bounds
   * @typedef {{ sends: number, logs: number, stateCalls: number }} Caps
   * @typedef {{ bounds: Bounds, caps: Caps | null, codes: Record<string, string> }} BootConfig
   * @typedef {{ sends: number, logs: number, stateCalls: number }} RunBudget
   * @typedef {{ resolve(value: unknown): void, reject(reason: unknown): void, run: number, op: string }} Pending
   * @typedef {{ ok: boolean, code?: string, message?: string, json?: string, value?: number, [key: string]: unknown }} HostRecord
   */
  /**
   * @param {HostRef} hostSend (run, id, target)
   * @param {HostRef} hostState (run, id, op, key, arg, ttlMs)
   * @param {HostRef} hostLog (run, text)
   * @param {HostRef} hostDone (run, record)
   * @param {BootConfig} config
   */
  function bootstrap(hostSend, hostState, hostLog, hostDone, config) {
    'use strict';
    const B = config.bounds;
    const CODES = config.codes;
    // Without caps (tests only) the isolate forwards everything and the host's own counting is shown to hold.
    const caps = config.caps;
    const { freeze, isFrozen, keys, defineProperty, getPrototypeOf, create } = Object;
    const isArray = Array.isArray;
    const apply = Reflect.apply;
    const toText = String;
    const stringify = JSON.stringify;
    const parse = JSON.parse;
    const isSafeInteger = Number.isSafeInteger;
    const strSlice = String.prototype.slice;
    const isPrototypeOf = Object.prototype.isPrototypeOf;
    const applyIgnored = getPrototypeOf(hostSend).applyIgnored;
    const PromiseCtor = Promise;
    const PromisePrototype = Promise.prototype;
    const ErrorPrototype = Error.prototype;
    /** Options without a prototype: a script's getters on Object.prototype cannot change them. */
    const COPY = freeze({ __proto__: null, arguments: freeze({ __proto__: null, copy: true }) });

    // memoryLimit does not count WebAssembly.Memory: a selector has no use for it, so it is not there.
    delete (/** @type {{ WebAssembly?: unknown }} */ (globalThis)).WebAssembly;

    /** @type {Record<number, Pending>} */
    const pending = create(null);
    /** @type {Record<number, RunBudget>} Per run in progress: what it may still send, log and ask of ctx.state. */
    const runs = create(null);
    let nextId = 0;
    /** @type {Function | undefined} */
    let selectFn;
    /** The run whose host call (invoke or settle) is executing now; 0 before any (load time). */
    let entryRun = 0;

    /** @param {(resolve: (v: unknown) => void, reject: (e: unknown) => void) => void} executor */
    const promise = (executor) => new PromiseCtor(executor);
    /** @param {unknown} err */
    const rejected = (err) => promise((_resolve, reject) => reject(err));

    /** @param {string} text @param {number} max */
    function cut(text, max) {
      return text.length > max ? apply(strSlice, text, [0, max]) : text;
    }

    /** @param {unknown} value @param {number} [max] */
    function safeText(value, max = B.text) {
      try {
        return cut(typeof value === 'string' ? value : toText(value), max);
      } catch {
        return '';
      }
    }

    /** @param {unknown} value */
    const isError = (value) => value !== null && typeof value === 'object' && apply(isPrototypeOf, ErrorPrototype, [value]);

    class SendError extends Error {
      /** @param {{ code: string, downstream?: string | null, response?: string, responseCode?: number, permanent?: boolean, message?: string }} record */
      constructor(record) {
        super(record.message);
        this.name = 'SendError';
        this.code = record.code;
        this.downstream = record.downstream ?? null;
        this.response = record.response;
        this.responseCode = record.responseCode;
        this.permanent = record.permanent ?? false;
      }
    }
    const SendErrorPrototype = SendError.prototype;

    class StateError extends Error {
      /** @param {string} code @param {string} [detail] */
      constructor(code, detail = '') {
        super((CODES[code] ?? code) + detail);
        this.name = 'StateError';
        this.code = code;
      }
    }

    /** @param {string} code */
    const sendRefusal = (code) => rejected(new SendError({ code, downstream: null, permanent: false, message: CODES[code] }));

    /** A run's budget, or why it has none: no run is executing, or this one is over. @param {number} run */
    function budgetOf(run) {
      return run === 0 ? 'SMTPMUX_NO_RUN' : runs[run] ?? 'SMTPMUX_RUN_OVER';
    }

    /** @param {unknown} ds */
    function targetName(ds) {
      if (typeof ds === 'string') return cut(ds, B.name);
      if (ds && typeof ds === 'object') {
        const name = /** @type {{ name?: unknown }} */ (ds).name;
        if (typeof name === 'string') return cut(name, B.name);
      }
      return null;
    }

    /** @param {number} run @param {string} op */
    function expect(run, op) {
      const id = ++nextId;
      const answer = promise((resolve, reject) => (pending[id] = { resolve, reject, run, op }));
      return { id, answer };
    }

    /** @param {number} run @param {unknown} ds */
    function sendFor(run, ds) {
      const budget = budgetOf(run);
      if (typeof budget === 'string') return sendRefusal(budget);
      // The cap is kept here too, before anything crosses to the host: a script cannot flood the bridge.
      if (caps !== null) {
        if (budget.sends <= 0) return sendRefusal('SMTPMUX_SEND_LIMIT');
        budget.sends--;
      }
      const { id, answer } = expect(run, 'send');
      apply(applyIgnored, hostSend, [undefined, [run, id, targetName(ds)]]);
      return answer;
    }

    /** @param {unknown} value */
    function show(value) {
      if (typeof value === 'string') return cut(value, B.text);
      try {
        if (isError(value)) return safeText(/** @type {Error} */ (value).stack || value);
        const json = stringify(value);
        return json === undefined ? safeText(value) : cut(json, B.text);
      } catch {
        return safeText(value);
      }
    }

    /** @param {number} run @param {unknown[]} args */
    function logFor(run, args) {
      const budget = budgetOf(run);
      if (typeof budget === 'string') {
        const err = new Error(CODES[budget]);
        defineProperty(err, 'code', { value: budget });
        throw err;
      }
      if (caps !== null) {
        if (budget.logs <= 0) return;
        budget.logs--;
      }
      let line = '';
      for (let i = 0; i < args.length && i < B.logArgs && line.length < B.text; i++) line += (i ? ' ' : '') + show(args[i]);
      apply(applyIgnored, hostLog, [undefined, [run, cut(line, B.text)]]);
    }

    /**
     * ctx.state: checks what it can here (so a bad call fails at once, with a clear code), then asks the
     * host, which checks again and namespaces the key per user.
     * @param {number} run @param {'get' | 'set' | 'incr'} op @param {unknown} key @param {unknown} arg @param {unknown} options
     */
    function stateFor(run, op, key, arg, options) {
      const budget = budgetOf(run);
      if (typeof budget === 'string') return rejected(new StateError(budget));
      if (typeof key !== 'string' || key.length === 0 || key.length > B.stateKey) {
        return rejected(new StateError('SMTPMUX_STATE_BAD_KEY', ` (a string of 1 to ${B.stateKey} characters)`));
      }
      let payload;
      if (op === 'set') {
        try {
          payload = stringify(arg);
        } catch {
          payload = undefined;
        }
        if (typeof payload !== 'string') return rejected(new StateError('SMTPMUX_STATE_NOT_JSON'));
        if (payload.length > B.stateValue) return rejected(new StateError('SMTPMUX_STATE_TOO_BIG', ` (${B.stateValue} characters of JSON at most)`));
      } else if (op === 'incr') {
        payload = arg === undefined ? 1 : arg;
        if (!isSafeInteger(payload)) return rejected(new StateError('SMTPMUX_STATE_NOT_INTEGER', ' (incr takes a whole number)'));
      }
      let ttl;
      if (options !== undefined && options !== null) {
        if (typeof options !== 'object') return rejected(new StateError('SMTPMUX_STATE_BAD_TTL'));
        ttl = /** @type {{ ttlMs?: unknown }} */ (options).ttlMs;
        if (ttl !== undefined && (typeof ttl !== 'number' || !isSafeInteger(ttl) || ttl < 1 || ttl > B.ttlMs)) {
          return rejected(new StateError('SMTPMUX_STATE_BAD_TTL', ` (a whole number of milliseconds from 1 to ${B.ttlMs})`));
        }
      }
      if (caps !== null) {
        if (budget.stateCalls <= 0) return rejected(new StateError('SMTPMUX_STATE_LIMIT'));
        budget.stateCalls--;
      }
      const { id, answer } = expect(run, op);
      apply(applyIgnored, hostState, [undefined, [run, id, op, key, payload, ttl]]);
      return answer;
    }

    /** @param {unknown} value @returns {unknown} */
    function deepFreeze(value) {
      if (value && typeof value === 'object' && !isFrozen(value)) {
        freeze(value);
        const names = keys(value);
        for (let i = 0; i < names.length; i++) deepFreeze(/** @type {Record<string, unknown>} */ (value)[names[i]]);
      }
      return value;
    }

    /** The host's answer to a send() or a ctx.state call. @param {number} id @param {HostRecord} record */
    function settle(id, record) {
      const entry = pending[id];
      if (!entry) return;
      delete pending[id];
      entryRun = entry.run;
      if (entry.op === 'send') {
        if (record.ok) entry.resolve(deepFreeze(record));
        else entry.reject(new SendError(/** @type {any} */ (record)));
      } else if (!record.ok) {
        entry.reject(new StateError(safeText(record.code, B.name), record.message ? ` (${safeText(record.message)})` : ''));
      } else if (entry.op === 'get') {
        entry.resolve(record.json === undefined ? undefined : parse(record.json));
      } else if (entry.op === 'incr') {
        entry.resolve(record.value);
      } else {
        entry.resolve(undefined);
      }
    }

    /** Drops what the isolate holds for a run the host gave up on: its answers will never come. @param {number} run */
    function forget(run) {
      entryRun = 0;
      delete runs[run];
      for (const id of keys(pending)) if (pending[/** @type {any} */ (id)].run === run) delete pending[/** @type {any} */ (id)];
    }

    /** @param {unknown} fn */
    function bind(fn) {
      selectFn = typeof fn === 'function' ? fn : undefined;
      return selectFn !== undefined;
    }

    /** @param {unknown} err */
    function errorRecord(err) {
      try {
        if (isError(err)) {
          const e = /** @type {Error} */ (err);
          return {
            __proto__: null,
            kind: 'threw',
            name: safeText(e.name, B.name),
            message: safeText(e.message),
            stack: safeText(e.stack),
            sendError: apply(isPrototypeOf, SendErrorPrototype, [err]),
          };
        }
      } catch {
        // a getter on the error threw: report what can be said
      }
      return { __proto__: null, kind: 'reason', reason: show(err) };
    }

    /** @param {unknown} result @param {Record<string, boolean>} names */
    function normalize(result, names) {
      if (result === undefined || result === null) return { __proto__: null, kind: 'none' };
      if (typeof result === 'string') {
        return names[result] === true ? { __proto__: null, kind: 'order', targets: [result] } : { __proto__: null, kind: 'reason', reason: cut(result, B.text) };
      }
      const list = isArray(result) ? result : [result];
      if (list.length > B.targets) return { __proto__: null, kind: 'bad', detail: 'the returned list has more than ' + B.targets + ' items' };
      const targets = [];
      for (let i = 0; i < list.length; i++) {
        const name = targetName(list[i]);
        if (name === null) return { __proto__: null, kind: 'bad', detail: 'item ' + i + ' of the returned list is neither a downstream name nor a downstream object' };
        targets[i] = name;
      }
      return { __proto__: null, kind: 'order', targets };
    }

    /** The ctx a run's select() gets: every function carries the run id it was made with. @param {number} run */
    function contextFor(run) {
      return freeze({
        /** @param {unknown} ds */
        send: (ds) => sendFor(run, ds),
        /** @param {unknown[]} args */
        log: (...args) => logFor(run, args),
        state: freeze({
          /** @param {unknown} key */
          get: (key) => stateFor(run, 'get', key, undefined, undefined),
          /** @param {unknown} key @param {unknown} value @param {unknown} [options] */
          set: (key, value, options) => stateFor(run, 'set', key, value, options),
          /** @param {unknown} key @param {unknown} [by] @param {unknown} [options] */
          incr: (key, by, options) => stateFor(run, 'incr', key, by, options),
        }),
      });
    }

    /**
     * Starts one run: select(message, downstreams, ctx). Its outcome goes to hostDone when it settles.
     * @param {number} run @param {Record<string, unknown>} message @param {{ name: string, addr: string }[]} downstreams
     */
    function invoke(run, message, downstreams) {
      runs[run] = /** @type {RunBudget} */ ({ __proto__: null, sends: caps?.sends ?? 0, logs: caps?.logs ?? 0, stateCalls: caps?.stateCalls ?? 0 });
      entryRun = run;
      deepFreeze(message);
      deepFreeze(downstreams);
      /** @type {Record<string, boolean>} */
      const names = create(null);
      for (let i = 0; i < downstreams.length; i++) {
        names[downstreams[i].name] = true;
        names[downstreams[i].addr] = true;
      }
      const ctx = contextFor(run);
      const runner = async () => {
        // Only a native promise is awaited, and the value comes back boxed: awaiting or returning any
        // other object from an async function would call its (maybe hooked) then().
        const out = /** @type {Function} */ (selectFn)(message, downstreams, ctx);
        const value = out !== null && typeof out === 'object' && apply(isPrototypeOf, PromisePrototype, [out]) ? await out : out;
        return { __proto__: null, value };
      };
      // Not awaited by anyone: the outcome goes to the host through hostDone.
      (async () => {
        let record;
        try {
          record = normalize((await runner()).value, names);
        } catch (err) {
          record = errorRecord(err);
        }
        delete runs[run];
        apply(applyIgnored, hostDone, [undefined, [run, record], COPY]);
      })();
    }

    /** @param {string} name @param {unknown} value */
    const expose = (name, value) => defineProperty(globalThis, name, { value, writable: false, enumerable: false, configurable: false });
    // The globals: aliases for the run whose host call is executing.
    /** @param {unknown} ds */
    const send = (ds) => sendFor(entryRun, ds);
    /** @param {unknown[]} args */
    const log = (...args) => logFor(entryRun, args);
    expose('send', send);
    expose('log', log);
    expose('SendError', SendError);
    expose('StateError', StateError);
    expose('console', freeze({ log, info: log, warn: log, error: log, debug: log }));
    return { settle, bind, invoke, forget };
  }
);
