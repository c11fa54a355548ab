// The code compiled into every selector context before the user's script: the send()/log() wrappers
// and the invoke() trampoline that freezes the inputs and turns any result into a plain record.
// It talks to the host only through two References (hostSend, hostLog), fire-and-forget; results come
// back through settle(), which the host calls with a plain copy. Promise rejections never cross.
//
// Several messages may be inside one isolate at once, and send() is a global: it finds the run that
// called it from V8's async stack trace, where every run shows as a frame named __smtpmux_run_<id>
// (await chains and awaited .then() chains both keep it). A call whose stack has lost that frame (a
// promise chain nobody awaits) falls back to the run whose host callback is executing.
//
// The user's script runs after this and may replace any built-in (String, Array.prototype.map,
// Object.prototype.then...). So everything here uses built-ins captured before that, returns records
// without a prototype (a hooked `then` cannot intercept them), and bounds every string and list it
// hands out, so what reaches the host has the shape and the size the host expects.

/** Bounds on what crosses out of the isolate; the host checks them again. */
export const BOUNDS = {
  text: 2000,
  targets: 100,
  name: 200,
  logArgs: 20,
} as const;

export const BOOTSTRAP_SOURCE = String.raw`
const [hostSend, hostLog] = [$0, $1];
const B = ${JSON.stringify(BOUNDS)};
const { freeze, isFrozen, keys, defineProperty, getPrototypeOf } = Object;
const isArray = Array.isArray;
const apply = Reflect.apply;
const toText = String;
const stringify = JSON.stringify;
const ErrorCtor = Error;
const reExec = RegExp.prototype.exec;
const RUN_FRAME = /__smtpmux_run_(\d+)/;
const strSlice = String.prototype.slice;
const isPrototypeOf = Object.prototype.isPrototypeOf;
const applyIgnored = getPrototypeOf(hostSend).applyIgnored;
const PromiseCtor = Promise;
const PromisePrototype = Promise.prototype;
const rejected = (err) => new PromiseCtor((_resolve, reject) => reject(err));

const pending = { __proto__: null };
let nextId = 0;
let selectFn;
/** Per run in progress: what it may still send and log. */
const runs = { __proto__: null };
/** The run whose host callback (invoke or settle) is executing now. */
let entryRun = 0;

function callerRun() {
  const limit = ErrorCtor.stackTraceLimit;
  ErrorCtor.stackTraceLimit = 100;
  const stack = new ErrorCtor().stack;
  ErrorCtor.stackTraceLimit = limit;
  const found = typeof stack === 'string' ? apply(reExec, RUN_FRAME, [stack]) : null;
  return found ? +found[1] : entryRun;
}

function cut(text, max) {
  return text.length > max ? apply(strSlice, text, [0, max]) : text;
}

function safeText(value, max = B.text) {
  try {
    if (typeof value === 'string') return cut(value, max);
    return cut(toText(value), max);
  } catch {
    return '';
  }
}

class SendError extends Error {
  constructor(record) {
    super(record.message);
    this.name = 'SendError';
    this.code = record.code;
    this.downstream = record.downstream;
    this.response = record.response;
    this.responseCode = record.responseCode;
    this.permanent = record.permanent;
  }
}
const SendErrorPrototype = SendError.prototype;
const ErrorPrototype = Error.prototype;

function targetName(ds) {
  if (typeof ds === 'string') return cut(ds, B.name);
  if (ds && typeof ds === 'object' && typeof ds.name === 'string') return cut(ds.name, B.name);
  return null;
}

function send(ds) {
  const run = callerRun();
  const state = runs[run];
  if (!state) {
    return rejected(new SendError({ code: 'SMTPMUX_RUN_OVER', downstream: null, permanent: false, message: 'The selector run for this message is over' }));
  }
  // The cap is kept here, before anything crosses to the host: a script cannot flood the bridge.
  if (state.sends <= 0) {
    return rejected(new SendError({ code: 'SMTPMUX_SEND_LIMIT', downstream: null, permanent: false, message: 'Too many send() calls for one message' }));
  }
  state.sends--;
  const id = ++nextId;
  const promise = new PromiseCtor((resolve, reject) => (pending[id] = { resolve, reject, run }));
  apply(applyIgnored, hostSend, [undefined, [run, id, targetName(ds)]]);
  return promise;
}

function show(value) {
  if (typeof value === 'string') return cut(value, B.text);
  try {
    if (value !== null && typeof value === 'object' && apply(isPrototypeOf, ErrorPrototype, [value])) return safeText(value.stack || value, B.text);
    const json = stringify(value);
    return json === undefined ? safeText(value) : cut(json, B.text);
  } catch {
    return safeText(value);
  }
}

function log(...args) {
  const run = callerRun();
  const state = runs[run];
  if (!state || state.logs <= 0) return;
  state.logs--;
  let line = '';
  for (let i = 0; i < args.length && i < B.logArgs && line.length < B.text; i++) line += (i ? ' ' : '') + show(args[i]);
  apply(applyIgnored, hostLog, [undefined, [run, cut(line, B.text)]]);
}

function deepFreeze(value) {
  if (value && typeof value === 'object' && !isFrozen(value)) {
    freeze(value);
    const names = keys(value);
    for (let i = 0; i < names.length; i++) deepFreeze(value[names[i]]);
  }
  return value;
}

function settle(id, record) {
  const entry = pending[id];
  if (!entry) return;
  delete pending[id];
  entryRun = entry.run;
  if (record.ok) entry.resolve(deepFreeze(record));
  else entry.reject(new SendError(record));
}

function bind(fn) {
  selectFn = fn;
  return typeof fn === 'function';
}

function errorRecord(err) {
  try {
    if (err !== null && typeof err === 'object' && apply(isPrototypeOf, ErrorPrototype, [err])) {
      return {
        __proto__: null,
        kind: 'threw',
        name: safeText(err.name, B.name),
        message: safeText(err.message),
        stack: safeText(err.stack),
        sendError: apply(isPrototypeOf, SendErrorPrototype, [err]),
      };
    }
  } catch {
    // a getter on the error threw: report what can be said
  }
  return { __proto__: null, kind: 'reason', reason: show(err) };
}

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

async function invoke(run, message, downstreams, logLimit, sendLimit) {
  runs[run] = { __proto__: null, sends: sendLimit, logs: logLimit };
  entryRun = run;
  deepFreeze(message);
  deepFreeze(downstreams);
  const names = { __proto__: null };
  for (let i = 0; i < downstreams.length; i++) {
    names[downstreams[i].name] = true;
    names[downstreams[i].addr] = true;
  }
  // The frame send() looks for on the stack: named after this run.
  const name = '__smtpmux_run_' + run;
  const runner = {
    async [name]() {
      // Only a native promise is awaited, and the value comes back boxed: awaiting or returning any
      // other object from an async function would call its (maybe hooked) then().
      const out = selectFn(message, downstreams);
      const value = out !== null && typeof out === 'object' && apply(isPrototypeOf, PromisePrototype, [out]) ? await out : out;
      return { __proto__: null, value };
    },
  }[name];
  try {
    return normalize((await runner()).value, names);
  } catch (err) {
    return errorRecord(err);
  } finally {
    delete runs[run];
  }
}

const expose = (name, value) => defineProperty(globalThis, name, { value, writable: false, enumerable: false, configurable: false });
expose('send', send);
expose('log', log);
expose('SendError', SendError);
expose('console', freeze({ log, info: log, warn: log, error: log, debug: log }));
return { settle, bind, invoke };
`;
