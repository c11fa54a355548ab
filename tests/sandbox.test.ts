// The sandbox boundary over real SMTP: a selector that misbehaves costs its own message a 451 and
// nothing else; a message already delivered stays delivered exactly once; a script sees only plain
// copies (no credentials, no host APIs); users and concurrent messages never leak into each other.
import { startDownstream, subjectOf, type Downstream } from './support/downstream';
import { testConfig, type DownstreamSpec, type UserSpec } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { sendWithNodemailer, type Sent } from './support/clients';

const RELAY_USER = 'relay-user-7f3a';
const RELAY_PASS = 'S3cret-relay-pass-91c2';

const LIMITS = {
  limits: { selector_timeout_ms: 1000, selector_memory_mb: 16 },
  delivery: { connect_timeout_ms: 1000, socket_timeout_ms: 5000 },
};

/** One script for every misbehaviour: the first word of the subject says what to do. */
const HOSTILE = String.raw`
let runs = 0;

async function select(message, downstreams) {
  runs++;
  const kind = message.subject.split(' ')[0];
  switch (kind) {
    case 'throw':
      throw new Error('thrown on purpose');
    case 'loop':
      while (true) {}
    case 'loop-after-failed-send':
      try { await send('bad'); } catch (err) { log('failed send: ' + err.code + ' ' + err.responseCode); }
      while (true) {}
    case 'alloc': {
      const hog = [];
      while (true) hog.push(new Array(100000).fill(hog.length));
    }
    case 'throw-after-send':
      await send('good');
      throw new Error('thrown after delivery');
    case 'loop-after-send':
      await send('good');
      while (true) {}
    case 'alloc-after-send': {
      await send('good');
      const hog = [];
      while (true) hog.push(new Array(100000).fill(hog.length));
    }
    case 'send-twice': {
      await send('good');
      try { await send('good'); log('second send: ok'); } catch (err) { log('second send: ' + err.code); }
      try { await send('other'); log('third send: ok'); } catch (err) { log('third send: ' + err.code); }
      return;
    }
    case 'nonsense':
      return [42];
    case 'peek': {
      log('downstreams=' + JSON.stringify(downstreams));
      log('message=' + JSON.stringify(message) + ' frozen=' + Object.isFrozen(message) + ',' + Object.isFrozen(downstreams) + ',' + Object.isFrozen(downstreams[0]));
      log('types=' + [typeof process, typeof require, typeof setTimeout, typeof fetch, typeof setInterval, typeof module, typeof globalThis.ivm].join(','));
      log('globals=' + Object.getOwnPropertyNames(globalThis).join(','));
      return 'peeked: ' + [typeof process, typeof require, typeof setTimeout, typeof fetch].join(',');
    }
    default:
      log('runs=' + runs);
      return ['good'];
  }
}
`;

function user(email: string, selector: string, downstreams: DownstreamSpec[]): UserSpec {
  return { email, password: `password-of-${email}`, selector, downstreams };
}

function config(users: UserSpec[]): string {
  return testConfig({ ...LIMITS, users });
}

const as = (email: string) => ({ user: email, pass: `password-of-${email}` });

/** The outcome log line of the message a reply names (replies carry "message id X"). */
function outcomeFor(p: RunningProxy, subject: string, received: Sent): Record<string, unknown> {
  const id = /message id ([0-9A-Z]+)/.exec(received.response)?.[1];
  const line = p.logs.find((l) => typeof l.outcome === 'string' && l.msgId === id);
  if (!line) throw new Error(`no outcome line for "${subject}" (${received.response})`);
  return line;
}

function scriptLogs(p: RunningProxy): string[] {
  return p.logs.filter((l) => l.scriptLog === true).map((l) => String(l.msg));
}

describe('a selector that misbehaves', () => {
  let good: Downstream, bad: Downstream, other: Downstream;
  let proxy: RunningProxy;
  const me = as('test@user.com');

  beforeAll(async () => {
    good = await startDownstream({ user: RELAY_USER, pass: RELAY_PASS });
    bad = await startDownstream({ fail: { kind: 'reply', code: 451, message: '4.3.0 Try again later' } });
    other = await startDownstream();
    proxy = await startProxy({
      'hostile.js': HOSTILE,
      'config.yaml': config([
        user(
          'test@user.com',
          'hostile.js',
          [
            { name: 'good', addr: good.addr, user: RELAY_USER, pass: RELAY_PASS, tags: ['primary'] },
            { name: 'bad', addr: bad.addr },
            { name: 'other', addr: other.addr },
          ],
        ),
      ]),
    });
  });
  afterAll(async () => {
    await proxy?.stop();
    for (const ds of [good, bad, other]) await ds?.close();
  });
  beforeEach(() => {
    for (const ds of [good, bad, other]) ds.received.splice(0);
  });

  const send = (subject: string): Promise<Sent> => sendWithNodemailer(proxy.port, { subject, text: `body of ${subject}` }, me);

  const lastRuns = (): number => Number(scriptLogs(proxy).filter((l) => l.startsWith('runs=')).pop()?.slice(5) ?? 0);

  /**
   * Sends `subject`, expects a 451 4.3.0 with `code` logged against the script, then an ordinary message
   * that goes through: on a rebuilt isolate (module state starts over) or on the same one.
   */
  async function failsThenRecovers(subject: string, code: string, isolate: 'rebuilt' | 'kept'): Promise<void> {
    const expectRunsAfter = isolate === 'rebuilt' ? 1 : lastRuns() + 2;
    const sent = await send(subject);
    expect(sent.ok).toBe(false);
    expect(sent.code).toBe(451);
    expect(sent.response).toMatch(/^451 4\.3\.0 /);
    const line = outcomeFor(proxy, subject, sent);
    expect(line).toMatchObject({ outcome: 'deferred', code, user: 'test@user.com' });
    expect(String(line.selector)).toMatch(/hostile\.js$/);
    expect(good.received).toHaveLength(0);

    const next = await send('ok after ' + subject);
    expect(next).toMatchObject({ ok: true, code: 250 });
    expect(good.received).toHaveLength(1);
    expect(subjectOf(good.received[0].raw)).toBe('ok after ' + subject);
    // Module state tells whether the host rebuilt the isolate (runs starts over) or kept it.
    expect(scriptLogs(proxy).filter((l) => l.startsWith('runs=')).pop()).toBe(`runs=${expectRunsAfter}`);
  }

  test('a selector that throws gets 451 and the next message still goes through on the same isolate', async () => {
    await failsThenRecovers('throw now', 'SMTPMUX_SELECTOR_FAILED', 'kept');
    const line = proxy.logs.filter((l) => l.code === 'SMTPMUX_SELECTOR_FAILED').pop()!;
    expect(line.selectorResult).toMatchObject({ kind: 'fault', fault: 'threw', detail: 'Error: thrown on purpose' });
    expect(String((line.selectorResult as { location?: string }).location)).toMatch(/hostile\.js:\d+:\d+$/);
  });

  test('a selector that loops forever synchronously gets 451, and the next message goes through on a rebuilt isolate', async () => {
    const started = Date.now();
    await failsThenRecovers('loop now', 'SMTPMUX_SELECTOR_TIMEOUT', 'rebuilt');
    expect(Date.now() - started).toBeLessThan(5000);
  });

  test('a selector that loops after await send() on a downstream that fails gets 451, and the next message goes through', async () => {
    await failsThenRecovers('loop-after-failed-send now', 'SMTPMUX_SELECTOR_TIMEOUT', 'rebuilt');
    expect(scriptLogs(proxy)).toContain('failed send: EMESSAGE 451');
    expect(bad.received).toHaveLength(0);
  });

  test('a selector that allocates without bound hits the memory limit, gets 451, and the next message goes through', async () => {
    await failsThenRecovers('alloc now', 'SMTPMUX_SELECTOR_MEMORY', 'rebuilt');
  });

  test('a selector that returns nonsense gets 451', async () => {
    await failsThenRecovers('nonsense now', 'SMTPMUX_SELECTOR_BAD_RESULT', 'kept');
  });

  test('a script that throws after a successful send() still gets 250 and exactly one delivery', async () => {
    const sent = await send('throw-after-send now');
    expect(sent).toMatchObject({ ok: true, code: 250 });
    expect(good.received).toHaveLength(1);
    const line = outcomeFor(proxy, 'throw-after-send', sent);
    expect(line).toMatchObject({ level: 40, outcome: 'delivered', downstream: 'good', selectorResult: { kind: 'fault', fault: 'threw' } });
    expect((line.attempts as unknown[]).length).toBe(1);
  });

  test('a script that loops after a successful send() still gets 250 and exactly one delivery', async () => {
    const sent = await send('loop-after-send now');
    expect(sent).toMatchObject({ ok: true, code: 250 });
    const line = outcomeFor(proxy, 'loop-after-send', sent);
    expect(line).toMatchObject({ outcome: 'delivered', selectorResult: { kind: 'fault', fault: 'timeout' } });
    expect((line.attempts as unknown[]).length).toBe(1);
    // Give a stray second delivery the chance to show up.
    expect(await send('ok after loop-after-send')).toMatchObject({ ok: true });
    expect(good.received.map((r) => subjectOf(r.raw))).toEqual(['loop-after-send now', 'ok after loop-after-send']);
  });

  test('a script that runs out of memory after a successful send() still gets 250 and exactly one delivery', async () => {
    const sent = await send('alloc-after-send now');
    expect(sent).toMatchObject({ ok: true, code: 250 });
    expect(outcomeFor(proxy, 'alloc-after-send', sent)).toMatchObject({ outcome: 'delivered', selectorResult: { kind: 'fault', fault: 'memory' } });
    expect(good.received).toHaveLength(1);
  });

  test('send() after a delivery fails with SMTPMUX_ALREADY_DELIVERED and sends no copy', async () => {
    const sent = await send('send-twice now');
    expect(sent).toMatchObject({ ok: true, code: 250 });
    expect(good.received).toHaveLength(1);
    expect(other.received).toHaveLength(0);
    expect(scriptLogs(proxy)).toEqual(expect.arrayContaining(['second send: SMTPMUX_ALREADY_DELIVERED', 'third send: SMTPMUX_ALREADY_DELIVERED']));
  });

  test('a script cannot see downstream credentials, process, require, timers or fetch', async () => {
    const sent = await send('peek now');
    expect(sent).toMatchObject({ ok: false, code: 451 });
    const logs = scriptLogs(proxy);
    const views = JSON.parse(logs.find((l) => l.startsWith('downstreams='))!.slice('downstreams='.length)) as Record<string, unknown>[];
    expect(views.map((v) => v.name)).toEqual(['good', 'bad', 'other']);
    // The config fields (never credentials) and the host's status snapshot of each downstream.
    const fields = ['addr', 'cooldownUntil', 'failures', 'host', 'inflight', 'lastError', 'name', 'port', 'quota', 'rate', 'state', 'tags', 'tls', 'weight'];
    for (const view of views) expect(Object.keys(view).sort()).toEqual(fields);
    expect(views[0]).toMatchObject({ addr: good.addr, host: '127.0.0.1', port: good.port, tags: ['primary'] });
    const everything = logs.join('\n');
    expect(everything).not.toContain(RELAY_PASS);
    expect(everything).not.toContain(RELAY_USER);
    expect(everything).not.toContain('password-of-');
    expect(logs).toContain('types=undefined,undefined,undefined,undefined,undefined,undefined,undefined');
    const globals = logs.find((l) => l.startsWith('globals='))!.slice('globals='.length).split(',');
    for (const name of ['process', 'require', 'module', 'setTimeout', 'setInterval', 'fetch', 'XMLHttpRequest', 'WebAssembly.instantiate']) expect(globals).not.toContain(name);
    const message = logs.find((l) => l.startsWith('message='))!;
    expect(message).toMatch(/ frozen=true,true,true$/);
    expect(Object.keys(JSON.parse(message.slice('message='.length, message.lastIndexOf(' frozen='))) as object).sort()).toEqual([
      'attempt',
      'clientAddress',
      'from',
      'id',
      'queuedAt',
      'size',
      'subject',
      'to',
      'user',
    ]);
    // The failure reason the script returned is logged with the message.
    expect(outcomeFor(proxy, 'peek', sent).selectorResult).toMatchObject({ kind: 'reason', reason: 'peeked: undefined,undefined,undefined,undefined' });
  });
});

describe('isolation between users and between messages', () => {
  let a: Downstream, b: Downstream, c: Downstream, rr1: Downstream, rr2: Downstream;
  let proxy: RunningProxy;

  beforeAll(async () => {
    // a and b refuse some messages by subject, so the waterfall spreads concurrent messages over a, b, c.
    a = await startDownstream({ decide: (raw) => (/skip-a/.test(subjectOf(raw)) ? { kind: 'reply', code: 451, message: '4.3.0 Not this one' } : undefined) });
    b = await startDownstream({ decide: (raw) => (/skip-b/.test(subjectOf(raw)) ? { kind: 'reply', code: 451, message: '4.3.0 Not this one' } : undefined) });
    c = await startDownstream();
    rr1 = await startDownstream();
    rr2 = await startDownstream();
    const plain = (pairs: [string, Downstream][]): DownstreamSpec[] => pairs.map(([name, ds]) => ({ name, addr: ds.addr }));
    proxy = await startProxy({
      'looper.js': 'function select() { while (true) {} }',
      'esm.js': 'export default function (message, downstreams) { return downstreams[downstreams.length - 1]; }',
      'config.yaml': config([
        user('looper@user.com', 'looper.js', plain([['rr1', rr1]])),
        user('rr@user.com', 'round-robin.js', plain([['rr1', rr1], ['rr2', rr2]])),
        user('falls@user.com', 'waterfall.js', plain([['a', a], ['b', b], ['c', c]])),
        user('esm@user.com', 'esm.js', plain([['rr1', rr1], ['rr2', rr2]])),
      ]),
    });
  });
  afterAll(async () => {
    await proxy?.stop();
    for (const ds of [a, b, c, rr1, rr2]) await ds?.close();
  });

  test('a hostile script does not stop other users’ messages', async () => {
    const started = Date.now();
    const timed = (p: Promise<Sent>) => p.then((r) => ({ ...r, at: Date.now() - started }));
    const looping = [1, 2, 3].map((i) => timed(sendWithNodemailer(proxy.port, { subject: `loop ${i}` }, as('looper@user.com'))));
    // Let the looper get into its loop first.
    await new Promise((r) => setTimeout(r, 100));
    const fine = Array.from({ length: 6 }, (_, i) => timed(sendWithNodemailer(proxy.port, { subject: `rr ${i}` }, as('rr@user.com'))));
    const [loopResults, fineResults] = [await Promise.all(looping), await Promise.all(fine)];
    for (const r of loopResults) expect(r).toMatchObject({ ok: false, code: 451 });
    for (const r of fineResults) expect(r).toMatchObject({ ok: true, code: 250 });
    // The looper's messages end only at its one-second deadline: the round-robin user finished before them.
    expect(Math.max(...fineResults.map((r) => r.at))).toBeLessThan(Math.max(...loopResults.map((r) => r.at)));
    expect(rr1.received.length + rr2.received.length).toBe(6);
    expect(rr1.received.map((r) => subjectOf(r.raw)).every((s) => s.startsWith('rr '))).toBe(true);
  });

  test('messages of one user sent concurrently through waterfall are not mixed up', async () => {
    const plan: Record<string, Downstream> = { 'm1': a, 'm2 skip-a': b, 'm3 skip-a skip-b': c, 'm4': a, 'm5 skip-a': b };
    const results = await Promise.all(
      Object.keys(plan).map((subject) => sendWithNodemailer(proxy.port, { subject, text: `the body of <${subject}>` }, as('falls@user.com'))),
    );
    for (const r of results) expect(r).toMatchObject({ ok: true, code: 250 });
    const got = (ds: Downstream): string[] => ds.received.map((r) => subjectOf(r.raw)).sort();
    expect(got(a)).toEqual(['m1', 'm4']);
    expect(got(b)).toEqual(['m2 skip-a', 'm5 skip-a']);
    expect(got(c)).toEqual(['m3 skip-a skip-b']);
    // Each body travelled with its own subject.
    for (const ds of [a, b, c]) for (const r of ds.received) expect(r.raw.toString()).toContain(`the body of <${subjectOf(r.raw)}>`);
    // And each reply named the downstream its own message went to.
    Object.values(plan).forEach((ds, i) => expect(results[i].response).toMatch(new RegExp(`via ${ds === a ? 'a' : ds === b ? 'b' : 'c'} `)));
  });

  test('an ES module selector with a default export routes messages', async () => {
    rr2.received.splice(0);
    expect(await sendWithNodemailer(proxy.port, { subject: 'esm' }, as('esm@user.com'))).toMatchObject({ ok: true });
    expect(rr2.received.map((r) => subjectOf(r.raw))).toEqual(['esm']);
  });
});
