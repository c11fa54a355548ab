// The code compiled into every selector context before the user's script: the send()/log() wrappers
// and the invoke() trampoline that freezes the inputs and turns any result into a plain record.
// It talks to the host only through two References (hostSend, hostLog), fire-and-forget; results come
// back through settle(), which the host calls with a plain copy. Promise rejections never cross.

export const BOOTSTRAP_SOURCE = String.raw`
const [hostSend, hostLog] = [$0, $1];
const pending = new Map();
let nextId = 0;
let selectFn;
let logBudget = 0;

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

function targetName(ds) {
  if (typeof ds === 'string') return ds;
  if (ds && typeof ds === 'object' && typeof ds.name === 'string') return ds.name;
  return null;
}

function send(ds) {
  const id = ++nextId;
  const promise = new Promise((resolve, reject) => pending.set(id, { resolve, reject }));
  hostSend.applyIgnored(undefined, [id, targetName(ds)]);
  return promise;
}

function show(value) {
  if (typeof value === 'string') return value;
  if (value instanceof Error) return value.stack || String(value);
  try { return JSON.stringify(value) ?? String(value); } catch { return String(value); }
}

function log(...args) {
  if (logBudget <= 0) return;
  logBudget--;
  hostLog.applyIgnored(undefined, [args.map(show).join(' ').slice(0, 2000)]);
}

function deepFreeze(value) {
  if (value && typeof value === 'object' && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const key of Object.keys(value)) deepFreeze(value[key]);
  }
  return value;
}

function settle(id, record) {
  const entry = pending.get(id);
  if (!entry) return;
  pending.delete(id);
  if (record.ok) entry.resolve(deepFreeze(record));
  else entry.reject(new SendError(record));
}

function bind(fn) {
  selectFn = fn;
  return typeof fn === 'function';
}

function errorRecord(err) {
  if (err instanceof Error) {
    return { kind: 'threw', name: err.name, message: String(err.message), stack: String(err.stack || ''), sendError: err instanceof SendError };
  }
  return { kind: 'reason', reason: show(err) };
}

function toName(item, names) {
  if (typeof item === 'string') return item;
  if (item && typeof item === 'object' && typeof item.name === 'string') return item.name;
  return undefined;
}

function normalize(result, names) {
  if (result === undefined || result === null) return { kind: 'none' };
  if (typeof result === 'string') return names.has(result) ? { kind: 'order', targets: [result] } : { kind: 'reason', reason: result };
  const list = Array.isArray(result) ? result : [result];
  const targets = list.map((item) => toName(item, names));
  const bad = targets.findIndex((t) => t === undefined);
  if (bad >= 0) return { kind: 'bad', detail: 'item ' + bad + ' of the returned list is neither a downstream name nor a downstream object' };
  return { kind: 'order', targets };
}

async function invoke(message, downstreams, logLimit) {
  logBudget = logLimit;
  deepFreeze(message);
  deepFreeze(downstreams);
  const names = new Set(downstreams.flatMap((ds) => [ds.name, ds.addr]));
  try {
    return normalize(await selectFn(message, downstreams), names);
  } catch (err) {
    return errorRecord(err);
  }
}

const hidden = { writable: false, enumerable: false, configurable: false };
Object.defineProperty(globalThis, 'send', { value: send, ...hidden });
Object.defineProperty(globalThis, 'log', { value: log, ...hidden });
Object.defineProperty(globalThis, 'SendError', { value: SendError, ...hidden });
Object.defineProperty(globalThis, 'console', { value: Object.freeze({ log, info: log, warn: log, error: log, debug: log }), ...hidden });
return { settle, bind, invoke };
`;
