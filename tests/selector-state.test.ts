// ctx.state: small JSON values a selector keeps per user, across messages and reloads, in the host's
// StateStore (which the App owns, so it outlives every Runtime). Bounded in key and value size, keys per
// user and calls per message; every failure is a StateError with a code inside the script.
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { startDownstream, subjectOf, type Downstream } from './support/downstream';
import { startProxy, type RunningProxy } from './support/proxy';
import { testConfig } from './support/config';
import { sendWithNodemailer } from './support/clients';
import { SelectorState } from '../src/selector/state';
import { BOUNDS, RUN_CAPS, STATE_KEYS_PER_USER } from '../src/selector/bounds';
import { MemoryStateStore } from '../src/state/memory';
import { StateFullError } from '../src/state/store';

function config(a: Downstream, b: Downstream, selector: string, timeoutMs = 2000): string {
  const downstreams = [
    { name: 'a', addr: a.addr },
    { name: 'b', addr: b.addr },
  ];
  return testConfig({
    limits: { selector_timeout_ms: timeoutMs, selector_memory_mb: 32 },
    delivery: { connect_timeout_ms: 1000, socket_timeout_ms: 5000 },
    users: ['one@user.com', 'two@user.com'].map((email) => ({ email, selector, downstreams })),
  });
}

/** Does what the subject says with ctx.state and logs what came back; always routes to "a". */
const STATEFUL = String.raw`
async function attempt(ctx, fn) {
  try { const v = await fn(); return v === undefined ? 'undefined' : JSON.stringify(v); } catch (err) { return (err instanceof StateError ? 'StateError ' : 'other ') + err.code; }
}
async function select(message, downstreams, ctx) {
  const [op, ...args] = message.subject.split(' ');
  const s = ctx.state;
  const out = [];
  switch (op) {
    case 'set': out.push(await attempt(ctx, () => s.set(args[0], JSON.parse(args.slice(1).join(' '))))); break;
    case 'set-ttl': out.push(await attempt(ctx, () => s.set(args[0], 'short-lived', { ttlMs: 1000 }))); break;
    case 'get': out.push(await attempt(ctx, () => s.get(args[0]))); break;
    case 'incr': out.push(await attempt(ctx, () => s.incr(args[0], args[1] === undefined ? undefined : Number(args[1])))); break;
    case 'copy': {
      const value = await s.get(args[0]);
      value.changed = true;
      out.push(await attempt(ctx, () => s.get(args[0])));
      break;
    }
    case 'bad':
      out.push(await attempt(ctx, () => s.get('')));
      out.push(await attempt(ctx, () => s.get('k'.repeat(201))));
      out.push(await attempt(ctx, () => s.set('f', () => 1)));
      out.push(await attempt(ctx, () => s.set('u', undefined)));
      out.push(await attempt(ctx, () => s.set('big', 'x'.repeat(9000))));
      out.push(await attempt(ctx, () => s.incr('n', 1.5)));
      out.push(await attempt(ctx, () => s.set('t', 1, { ttlMs: -5 })));
      await s.set('word', 'hello');
      out.push(await attempt(ctx, () => s.incr('word')));
      break;
    case 'many': {
      const results = await Promise.all(Array.from({ length: 60 }, (_, i) => attempt(ctx, () => s.incr('many'))));
      out.push(results.filter((r) => r === 'StateError SMTPMUX_STATE_LIMIT').length + ' refused');
      break;
    }
  }
  ctx.log(op + ': ' + out.join(' | '));
  return ['a'];
}
`;

describe('ctx.state over real SMTP', () => {
  let a: Downstream, b: Downstream;
  let proxy: RunningProxy;
  beforeAll(async () => {
    a = await startDownstream();
    b = await startDownstream();
  });
  afterEach(async () => {
    await proxy?.stop();
    a.received.splice(0);
    b.received.splice(0);
  });
  afterAll(async () => {
    for (const ds of [a, b]) await ds?.close();
  });

  const as = (email: string) => ({ user: email, pass: 'password123' });
  /** Sends one message whose subject is a ctx.state command, and returns what the script logged. */
  async function run(subject: string, user = 'one@user.com'): Promise<string> {
    const before = proxy.logs.length;
    expect(await sendWithNodemailer(proxy.port, { subject }, as(user))).toMatchObject({ ok: true });
    const line = proxy.logs.slice(before).find((l) => l.scriptLog === true);
    return String(line?.msg);
  }

  test('values are kept per user, returned as copies, counted atomically and expire with ttlMs', async () => {
    proxy = await startProxy({ 'config.yaml': config(a, b, 'stateful.js'), 'stateful.js': STATEFUL });
    expect(await run('get colour')).toBe('get: undefined');
    expect(await run('set colour {"name":"blue","n":[1,2]}')).toBe('set: undefined');
    expect(await run('get colour')).toBe('get: {"name":"blue","n":[1,2]}');
    expect(await run('copy colour')).toBe('copy: {"name":"blue","n":[1,2]}');
    // Another user's namespace: the same key holds nothing there.
    expect(await run('get colour', 'two@user.com')).toBe('get: undefined');
    expect(await run('incr hits')).toBe('incr: 1');
    expect(await run('incr hits 41')).toBe('incr: 42');
    expect(await run('set-ttl soon')).toBe('set-ttl: undefined');
    expect(await run('get soon')).toBe('get: "short-lived"');
    await new Promise((r) => setTimeout(r, 1100));
    expect(await run('get soon')).toBe('get: undefined');
    // Concurrent messages never take the same number.
    const subjects = Array.from({ length: 8 }, () => 'incr race');
    const before = proxy.logs.length;
    await Promise.all(subjects.map((subject) => sendWithNodemailer(proxy.port, { subject }, as('one@user.com'))));
    const got = proxy.logs.slice(before).filter((l) => l.scriptLog === true).map((l) => Number(String(l.msg).slice('incr: '.length)));
    expect(got.sort((x, y) => x - y)).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
  });

  test('bad keys, values and steps are refused with a StateError code, and a message gets 50 calls', async () => {
    proxy = await startProxy({ 'config.yaml': config(a, b, 'stateful.js'), 'stateful.js': STATEFUL });
    expect(await run('bad')).toBe(
      'bad: ' +
        [
          'SMTPMUX_STATE_BAD_KEY',
          'SMTPMUX_STATE_BAD_KEY',
          'SMTPMUX_STATE_NOT_JSON',
          'SMTPMUX_STATE_NOT_JSON',
          'SMTPMUX_STATE_TOO_BIG',
          'SMTPMUX_STATE_NOT_INTEGER',
          'SMTPMUX_STATE_BAD_TTL',
          'SMTPMUX_STATE_NOT_INTEGER',
        ]
          .map((code) => `StateError ${code}`)
          .join(' | '),
    );
    expect(await run('many')).toBe(`many: ${60 - RUN_CAPS.stateCalls} refused`);
  });

  test('the bundled round-robin.js carries its rotation on across a reload that recompiles it', async () => {
    const file = 'config.yaml';
    proxy = await startProxy({ [file]: config(a, b, 'round-robin.js') });
    const sendThree = async (tag: string) => {
      for (let i = 0; i < 3; i++) expect(await sendWithNodemailer(proxy.port, { subject: `${tag} ${i}` }, as('one@user.com'))).toMatchObject({ ok: true });
    };
    await sendThree('before');
    // A different limit compiles the selector afresh (a new isolate, module state gone).
    writeFileSync(path.join(proxy.dir, file), config(a, b, 'round-robin.js', 2500));
    const reloaded = await proxy.app.reload('test');
    expect(reloaded.ok).toBe(true);
    expect(proxy.logs.find((l) => l.msg === 'reloaded')).toMatchObject({ selectorsCompiled: expect.arrayContaining([expect.stringContaining('round-robin.js')]) });
    await sendThree('after');
    const where = (ds: Downstream) => ds.received.map((r) => subjectOf(r.raw));
    expect(where(a)).toEqual(['before 0', 'before 2', 'after 1']);
    expect(where(b)).toEqual(['before 1', 'after 0', 'after 2']);
  });
});

describe('ctx.state bounds on the host side', () => {
  test('a user holds at most STATE_KEYS_PER_USER live keys; existing keys can still be written, other users are unaffected', async () => {
    const store = new MemoryStateStore();
    const mine = new SelectorState(store, 'Me@Example.com');
    for (let i = 0; i < STATE_KEYS_PER_USER; i++) expect(await mine.call('set', `k${i}`, '1', undefined)).toEqual({ ok: true });
    expect(await mine.call('set', 'one-more', '1', undefined)).toMatchObject({ ok: false, code: 'SMTPMUX_STATE_FULL' });
    expect(await mine.call('incr', 'one-more', 1, undefined)).toMatchObject({ ok: false, code: 'SMTPMUX_STATE_FULL' });
    expect(await mine.call('set', 'k7', '"rewritten"', undefined)).toEqual({ ok: true });
    expect(await mine.call('get', 'k7', undefined, undefined)).toEqual({ ok: true, json: '"rewritten"' });
    expect(await new SelectorState(store, 'other@example.com').call('set', 'k1', '2', undefined)).toEqual({ ok: true });
    // The host checks again what the isolate checks first.
    expect(await mine.call('set', 'k1', 'x'.repeat(BOUNDS.stateValue + 1), undefined)).toMatchObject({ code: 'SMTPMUX_STATE_NOT_JSON' });
    expect(await mine.call('set', 'k1', JSON.stringify('x'.repeat(BOUNDS.stateValue)), undefined)).toMatchObject({ code: 'SMTPMUX_STATE_TOO_BIG' });
    expect(await mine.call('get', 'k'.repeat(BOUNDS.stateKey + 1), undefined, undefined)).toMatchObject({ code: 'SMTPMUX_STATE_BAD_KEY' });
    expect(await mine.call('drop', 'k1', undefined, undefined)).toMatchObject({ ok: false });
  });

  test('a login with a colon in it cannot reach the keys of another user', async () => {
    const store = new MemoryStateStore();
    const short = new SelectorState(store, 'app@example.com');
    const longer = new SelectorState(store, 'app@example.com:x');
    expect(await short.call('set', 'x:secret', '"mine"', undefined)).toEqual({ ok: true });
    expect(await longer.call('get', 'secret', undefined, undefined)).toEqual({ ok: true });
    expect(await longer.call('set', 'secret', '"theirs"', undefined)).toEqual({ ok: true });
    expect(await short.call('get', 'x:secret', undefined, undefined)).toEqual({ ok: true, json: '"mine"' });
  });

  test('an expired key frees its place in the scope', async () => {
    let now = 1000;
    const store = new MemoryStateStore(() => now);
    const scope = { name: 'sel:x', maxKeys: 2 };
    await store.set('sel:x:a', '1', 50, scope);
    await store.set('sel:x:b', '1', undefined, scope);
    await expect(store.set('sel:x:c', '1', undefined, scope)).rejects.toBeInstanceOf(StateFullError);
    now += 100;
    await store.set('sel:x:c', '1', undefined, scope);
    await expect(store.incr('sel:x:d', 1, undefined, scope)).rejects.toBeInstanceOf(StateFullError);
    expect(await store.incr('sel:x:b', 1, undefined, scope)).toBe(2);
  });
});
