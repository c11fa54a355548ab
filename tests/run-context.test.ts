// The run context: select(message, downstreams, ctx) with ctx.send/ctx.log bound to the message on the
// host side, and the global send()/log() as aliases for the run whose step is executing. Nothing is
// inferred from stack traces, so the tricks that used to fake them cannot send another message anywhere.
// Also the limits a script cannot get around: no WebAssembly, a strict bootstrap that hands nothing
// private to Error.prepareStackTrace, and a run's budget counted on the host side.
import { startDownstream, subjectOf, type Downstream } from './support/downstream';
import { startProxy, type RunningProxy } from './support/proxy';
import { testConfig } from './support/config';
import { sendWithNodemailer } from './support/clients';
import { SelectorSandbox } from '../src/selector/sandbox';
import { RUN_CAPS } from '../src/selector/bounds';
import type { DownstreamView, MessageSummary, RunHost, SendRecord } from '../src/selector/types';

function config(selector: string, downstreams: Record<string, Downstream>): string {
  return testConfig({
    limits: { selector_timeout_ms: 3000, selector_memory_mb: 32 },
    delivery: { connect_timeout_ms: 1000, socket_timeout_ms: 5000, max_connections: 10 },
    selector,
    downstreams: Object.entries(downstreams).map(([name, ds]) => ({ name, addr: ds.addr })),
  });
}

const received = (ds: Downstream): string[] => ds.received.map((r) => subjectOf(r.raw)).sort();
const scriptLogs = (p: RunningProxy): string[] => p.logs.filter((l) => l.scriptLog === true).map((l) => String(l.msg));

/** Every way of calling send(): the subject names the style and the downstream. */
const STYLES = String.raw`
async function viaHelper(ctx, name) { await ctx.send(name); }
async function globalHelper(name) { await send(name); }
function select(message, downstreams, ctx) {
  const [style, target] = message.subject.split(' ');
  switch (style) {
    case 'ctx-await': return (async () => { await ctx.send(target); ctx.log(message.subject + ' done'); })();
    case 'ctx-helper': return viaHelper(ctx, target);
    case 'ctx-then': return ctx.send('nowhere').then(() => 'unreachable', () => ctx.send(target)).then(() => undefined);
    case 'ctx-unawaited': ctx.send(target); return undefined;
    case 'ctx-all': return Promise.allSettled([ctx.send('nowhere'), ctx.send(target)]).then(() => undefined);
    case 'global-await': return (async () => { await send(target); log(message.subject + ' done'); })();
    case 'global-helper': return globalHelper(target);
    case 'global-then': return send('nowhere').then(() => 'unreachable', () => send(target)).then(() => undefined);
    case 'global-unawaited': send(target); return undefined;
    case 'global-all': return Promise.allSettled([send('nowhere'), send(target)]).then(() => undefined);
    default: return 'unknown style';
  }
}
`;

describe('the run context', () => {
  let a: Downstream, b: Downstream, c: Downstream, nowhere: Downstream;
  let proxy: RunningProxy;
  const open: { close(): Promise<void> }[] = [];
  beforeAll(async () => {
    // Slow enough that every message is inside the isolate while the others start.
    const slow = { decide: () => ({ kind: 'stall', ms: 150 }) as const };
    [a, b, c] = [await startDownstream(slow), await startDownstream(slow), await startDownstream(slow)];
    nowhere = await startDownstream({ fail: { kind: 'reply', code: 451, message: '4.3.0 Not now' } });
    open.push(a, b, c, nowhere);
  });
  afterEach(async () => {
    await proxy?.stop();
    for (const ds of [a, b, c, nowhere]) ds.received.splice(0);
  });
  afterAll(async () => {
    for (const item of open) await item.close();
  });

  test('many concurrent messages, in every style of calling send(), each deliver their own message once', async () => {
    proxy = await startProxy({ 'config.yaml': config('styles.js', { a, b, c, nowhere }), 'styles.js': STYLES });
    const styles = ['ctx-await', 'ctx-helper', 'ctx-then', 'ctx-unawaited', 'ctx-all', 'global-await', 'global-helper', 'global-then', 'global-unawaited', 'global-all'];
    const plan = styles.flatMap((style, i) => [`${style} ${'abc'[i % 3]}`, `${style} ${'abc'[(i + 1) % 3]}`]);
    const results = await Promise.all(plan.map((subject) => sendWithNodemailer(proxy.port, { subject })));
    expect(results.map((r, i) => `${plan[i]}: ${r.code}`)).toEqual(plan.map((p) => `${p}: 250`));
    for (const [name, ds] of Object.entries({ a, b, c })) expect(received(ds)).toEqual(plan.filter((p) => p.endsWith(` ${name}`)).sort());
    expect(nowhere.received).toEqual([]);
    // Each log line carries the id of the message that wrote it: the one delivered where its subject says.
    const done = proxy.logs.filter((l) => l.scriptLog === true && String(l.msg).endsWith(' done'));
    expect(done.map((l) => String(l.msg)).sort()).toEqual(plan.filter((p) => /-await /.test(p)).map((p) => `${p} done`).sort());
    for (const line of done) {
      const outcome = proxy.logs.find((l) => l.msgId === line.msgId && typeof l.outcome === 'string');
      expect(outcome?.downstream).toBe(String(line.msg).split(' ')[1]);
    }
  });

  test('faking the old run frames (Error.prepareStackTrace, a method named __smtpmux_run_N) sends only the faker’s own message', async () => {
    const evil = await startDownstream();
    open.push(evil);
    const FAKER = String.raw`
function select(message, downstreams, ctx) {
  const [role, target] = message.subject.split(' ');
  if (role === 'victim') return (async () => { await ctx.send(target); })();
  // The attacker claims to be every run there is, both ways the old stack parsing could be fooled.
  Error.prepareStackTrace = () => Array.from({ length: 200 }, (_, i) => 'at __smtpmux_run_' + i + ' (x.js:1:1)').join('\n');
  const named = {};
  for (let i = 1; i <= 60; i++) named['__smtpmux_run_' + i] = async function () { try { await send('evil'); } catch {} };
  return (async () => {
    for (const name of Object.keys(named)) await named[name]();
  })();
}
`;
    proxy = await startProxy({ 'config.yaml': config('faker.js', { a, b, evil }), 'faker.js': FAKER });
    const victims = Array.from({ length: 6 }, (_, i) => `victim ${i % 2 ? 'a' : 'b'} ${i}`);
    const sends = victims.map((subject) => sendWithNodemailer(proxy.port, { subject }));
    await new Promise((r) => setTimeout(r, 50));
    const attacks = [1, 2].map((i) => sendWithNodemailer(proxy.port, { subject: `attacker x ${i}` }));
    const [victimResults, attackResults] = [await Promise.all(sends), await Promise.all(attacks)];
    for (const r of [...victimResults, ...attackResults]) expect(r).toMatchObject({ ok: true, code: 250 });
    expect(received(evil)).toEqual(['attacker x 1', 'attacker x 2']);
    expect([...received(a), ...received(b)].sort()).toEqual(victims.sort());
  });

  test('the global send() and log() called when no message runs (at load time) fail with SMTPMUX_NO_RUN', async () => {
    const LOADER = String.raw`
const seen = [];
send('a').then(() => seen.push('send: sent'), (err) => seen.push('send: ' + err.code));
try { log('at load'); seen.push('log: ok'); } catch (err) { seen.push('log: ' + err.code); }
function select(message, downstreams, ctx) {
  ctx.log(seen.join(', '));
  return ['a'];
}
`;
    proxy = await startProxy({ 'config.yaml': config('loader.js', { a }), 'loader.js': LOADER });
    expect(await sendWithNodemailer(proxy.port, { subject: 'after load' })).toMatchObject({ ok: true });
    expect(scriptLogs(proxy)).toEqual(['log: SMTPMUX_NO_RUN, send: SMTPMUX_NO_RUN']);
    expect(received(a)).toEqual(['after load']);
  });

  test('a selector has no WebAssembly, so it cannot allocate memory its limit does not count', async () => {
    const WASM = String.raw`
function select(message, downstreams, ctx) {
  ctx.log('typeof=' + typeof WebAssembly + ' own=' + Object.getOwnPropertyNames(globalThis).includes('WebAssembly'));
  const memory = new WebAssembly.Memory({ initial: 1000 });
  ctx.log('allocated ' + memory.buffer.byteLength);
  return ['a'];
}
`;
    proxy = await startProxy({ 'config.yaml': config('wasm.js', { a }), 'wasm.js': WASM });
    const sent = await sendWithNodemailer(proxy.port, { subject: 'wasm' });
    expect(sent).toMatchObject({ ok: false, code: 451 });
    expect(scriptLogs(proxy)).toEqual(['typeof=undefined own=false']);
    const line = proxy.logs.find((l) => typeof l.outcome === 'string')!;
    expect(line).toMatchObject({ code: 'SMTPMUX_SELECTOR_FAILED', selectorResult: { kind: 'fault', fault: 'threw', detail: 'ReferenceError: WebAssembly is not defined' } });
    expect(a.received).toEqual([]);
  });

  test('Error.prepareStackTrace hands a script none of the bootstrap’s functions, wherever the script runs from', async () => {
    const PEEK = String.raw`
const leaked = new Set();
Error.prepareStackTrace = (err, frames) => {
  for (const frame of frames) {
    const fn = frame.getFunction();
    if (fn !== undefined) leaked.add(fn.name || '(anonymous)');
    else if (frame.getThis() !== undefined) leaked.add('this of ' + frame.getFunctionName());
  }
  return '';
};
const capture = () => new Error('peek').stack;
function select(message, downstreams, ctx) {
  capture();
  ctx.log({ toJSON() { capture(); return 'json'; } });
  log({ toJSON() { capture(); return 'json'; } });
  return ctx.send('a').then(() => {
    capture();
    ctx.log('leaked=' + [...leaked].sort().join(','));
    // A result whose name is a getter: the bootstrap reads it.
    return [{ get name() { capture(); return 'a'; } }];
  });
}
`;
    proxy = await startProxy({ 'config.yaml': config('peek.js', { a }), 'peek.js': PEEK });
    expect(await sendWithNodemailer(proxy.port, { subject: 'peek' })).toMatchObject({ ok: true });
    // Only the script's own (sloppy-mode) functions show up: capture, select, the getter, toJSON.
    const leaked = scriptLogs(proxy).find((l) => l.startsWith('leaked='))!.slice('leaked='.length).split(',');
    for (const name of leaked) expect(['capture', 'select', 'toJSON', '(anonymous)', 'get name', '']).toContain(name);
  });
});

describe('a run’s budget, counted by the host even when the isolate does not count', () => {
  const message: MessageSummary = { id: 'M1', user: 'u@example.com', from: 'a@example.com', to: ['b@example.org'], size: 1, subject: 's', clientAddress: '127.0.0.1', attempt: 1, queuedAt: null };
  const downstreams: DownstreamView[] = [
    { name: 'a', addr: 'a.example:25', host: 'a.example', port: 25, tls: 'none', tags: [], weight: 1, state: 'up', cooldownUntil: null, failures: 0, lastError: null, quota: null, rate: null, inflight: 0 },
  ];

  function countingHost(): RunHost & { sends: number; stateCalls: number; lines: string[] } {
    const host = {
      sends: 0,
      stateCalls: 0,
      lines: [] as string[],
      log: (text: string) => void host.lines.push(text),
      send: async (): Promise<SendRecord> => {
        host.sends++;
        return { ok: false, downstream: 'a', code: 'ECONNECTION', permanent: false, message: 'no', ms: 0 };
      },
      state: {
        call: async () => {
          host.stateCalls++;
          return { ok: true as const, value: host.stateCalls };
        },
      },
    };
    return host;
  }

  test('a script whose log(), send() and ctx.state calls all cross still gets no more than the caps through', async () => {
    const FLOOD = String.raw`
async function select(message, downstreams, ctx) {
  const line = 'z'.repeat(1500);
  for (let i = 0; i < 5000; i++) ctx.log(i + ' ' + line);
  for (let i = 0; i < 500; i++) log('global ' + i);
  for (let i = 0; i < 300; i++) ctx.send('a').catch(() => {});
  await Promise.allSettled(Array.from({ length: 300 }, () => ctx.state.incr('n')));
  return undefined;
}
`;
    const sandbox = await SelectorSandbox.fromSource('/virtual/flood.js', FLOOD, { timeoutMs: 5000, memoryMb: 32, maxSends: 3 }, { isolateCaps: false });
    try {
      const host = countingHost();
      expect(await sandbox.run(message, downstreams, host)).toEqual({ kind: 'none' });
      const bytes = host.lines.reduce((sum, l) => sum + Buffer.byteLength(l), 0);
      expect(host.lines.length).toBeLessThanOrEqual(RUN_CAPS.logLines + 1);
      expect(bytes).toBeLessThanOrEqual(RUN_CAPS.logBytes + 200);
      expect(host.lines[host.lines.length - 1]).toMatch(/^\(log limit reached: /);
      // The Delivery refuses past max_sends; the sandbox lets one more through so it can say why.
      expect(host.sends).toBe(4);
      expect(host.stateCalls).toBe(RUN_CAPS.stateCalls);
    } finally {
      sandbox.dispose();
    }
  });
});
