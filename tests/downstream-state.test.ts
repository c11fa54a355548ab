// What the host knows about its downstreams, over real SMTP: cooldown after a back-off signal (contacted
// once, doubling, cleared by a success, healed by a probe), rate pacing, quotas charged only for accepted
// deliveries (in messages or recipients), what selectors read, and `smtpmux try` showing skipped ones.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { deadPort, startDownstream, subjectOf, type Downstream, type FailMode } from './support/downstream';
import { testConfig, type DownstreamSpec } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { sendWithNodemailer } from './support/clients';
import { runCli } from './support/cli';
import { stateKey } from '../src/downstreams/gate';

const open: { close(): Promise<void> }[] = [];
afterEach(async () => {
  for (const item of open.splice(0).reverse()) await item.close();
});

/** A test downstream that counts the messages it was offered and answers each as `answer` says. */
async function downstream(answer: (n: number) => FailMode | undefined = () => undefined): Promise<Downstream & { offered: () => number }> {
  let offered = 0;
  const ds = await startDownstream({ decide: () => answer(++offered) });
  open.push(ds);
  return Object.assign(ds, { offered: () => offered });
}

const IN_ORDER = 'function select(message, downstreams) { return downstreams; }\n';

function config(downstreams: DownstreamSpec[], selector = 'in-order.js', delivery: Record<string, unknown> = {}): string {
  return testConfig({
    limits: { selector_timeout_ms: 5000 },
    delivery: { connect_timeout_ms: 1000, socket_timeout_ms: 5000, attempt_timeout_ms: 3000, ...delivery },
    selector,
    downstreams,
  });
}

async function proxy(text: string, files: Record<string, string> = {}): Promise<RunningProxy> {
  const p = await startProxy({ 'config.yaml': text, 'in-order.js': IN_ORDER, ...files });
  open.push({ close: () => p.stop() });
  return p;
}

type Attempt = { downstream: string; ok: boolean; code?: string; skipped?: string; until?: string; probe?: boolean; coolingUntil?: string };
const outcomes = (p: RunningProxy) => p.logs.filter((l) => typeof l.outcome === 'string') as { attempts: Attempt[]; outcome: string; downstream?: string }[];
const THROTTLED: FailMode = { kind: 'reply', code: 454, message: 'Throttling failure: Maximum sending rate exceeded' };
/** What nodemailer calls a refused connection. */
const REFUSED = /^E(SOCKET|CONNECTION)$/;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe('cooldown', () => {
  test('a downstream that refuses connections or throttles is contacted once, not once per message, while it cools', async () => {
    const throttled = await downstream(() => THROTTLED);
    const good = await downstream();
    const down = await deadPort();
    const p = await proxy(
      config([
        { name: 'down', addr: `127.0.0.1:${down}`, cooldown: '30s' },
        { name: 'throttled', addr: throttled.addr, cooldown: '30s' },
        { name: 'good', addr: good.addr },
      ]),
    );
    for (let i = 0; i < 4; i++) expect(await sendWithNodemailer(p.port, { subject: `m${i}` })).toMatchObject({ ok: true, code: 250 });
    expect(throttled.offered()).toBe(1);
    expect(good.received).toHaveLength(4);
    const lines = outcomes(p);
    expect(lines[0].attempts.map((a) => [a.downstream, a.code, Boolean(a.coolingUntil)])).toEqual([
      ['down', expect.stringMatching(REFUSED), true],
      ['throttled', 'EMESSAGE', true],
      ['good', undefined, false],
    ]);
    for (const line of lines.slice(1)) {
      expect(line.attempts).toEqual([
        expect.objectContaining({ downstream: 'down', skipped: 'cooling', code: 'SMTPMUX_DOWNSTREAM_COOLING', until: expect.any(String) }),
        expect.objectContaining({ downstream: 'throttled', skipped: 'cooling', until: lines[0].attempts[1].coolingUntil }),
        expect.objectContaining({ downstream: 'good', ok: true }),
      ]);
    }
    expect(p.logs.filter((l) => l.msg === 'downstream cooling down').map((l) => l.downstream)).toEqual(['down', 'throttled']);
  });

  test('the cooldown doubles while the downstream keeps failing, a probe heals it, and a success clears it', async () => {
    let failing = true;
    const flaky = await downstream(() => (failing ? { kind: 'reply', code: 421, message: '4.7.0 Too many connections, slow down' } : undefined));
    const p = await proxy(config([{ name: 'flaky', addr: flaky.addr, cooldown: '800ms', cooldown_max: '10s' }]));
    // The pause each failure started: from its 'downstream cooling down' log line to the end of the cooldown.
    const pauses = () => p.logs.filter((l) => l.msg === 'downstream cooling down').map((l) => Date.parse(String(l.until)) - Date.parse(String(l.time)));

    expect(await sendWithNodemailer(p.port, { subject: 'first' })).toMatchObject({ ok: false, code: 451 });
    const [first] = pauses();
    expect(first).toBeGreaterThan(0);
    expect(first).toBeLessThanOrEqual(800);

    // Still cooling, and just contacted: refused at once, naming the reason, without contacting it.
    const refused = await sendWithNodemailer(p.port, { subject: 'refused' });
    expect(refused).toMatchObject({ ok: false, code: 451 });
    expect(refused.response).toMatch(/4\.4\.1 .*cooling down/);
    expect(flaky.offered()).toBe(1);

    await sleep(900);
    expect(await sendWithNodemailer(p.port, { subject: 'second failure' })).toMatchObject({ ok: false, code: 451 });
    const second = pauses()[1];
    expect(second).toBeGreaterThan(first + 400); // doubled: 1.6 s
    expect(second).toBeLessThanOrEqual(1600);

    // It recovers while still cooling; its only downstream cooling and the last contact a base cooldown
    // ago, the next message probes it.
    failing = false;
    await sleep(900);
    const probed = await sendWithNodemailer(p.port, { subject: 'probe' });
    expect(probed).toMatchObject({ ok: true, code: 250 });
    expect(outcomes(p)[3].attempts).toEqual([
      expect.objectContaining({ downstream: 'flaky', skipped: 'cooling' }),
      expect.objectContaining({ downstream: 'flaky', ok: true, probe: true }),
    ]);

    // Cleared: delivered without a probe, and the next failure starts again at the base cooldown.
    expect(await sendWithNodemailer(p.port, { subject: 'after' })).toMatchObject({ ok: true });
    expect(outcomes(p)[4].attempts[0].probe).toBeUndefined();
    failing = true;
    await sendWithNodemailer(p.port, { subject: 'fails again' });
    expect(pauses()[2]).toBeLessThanOrEqual(800);
    expect(flaky.received.map((r) => subjectOf(r.raw))).toEqual(['probe', 'after']);
  });

  test('ctx.send() to a cooling downstream fails at once with a temporary SendError of its own code, and waterfall.js skips it', async () => {
    const good = await downstream();
    const down = await deadPort();
    const downstreams = [{ name: 'down', addr: `127.0.0.1:${down}`, cooldown: '30s' }, { name: 'good', addr: good.addr }];
    const script = `async function select(message, downstreams, ctx) {
  try { await ctx.send('down'); } catch (err) { ctx.log('down: ' + err.code + ' permanent=' + err.permanent); }
  await ctx.send('good');
}\n`;
    const p = await proxy(config(downstreams, 'try-down.js'), { 'try-down.js': script });
    for (let i = 0; i < 2; i++) expect(await sendWithNodemailer(p.port, { subject: `s${i}` })).toMatchObject({ ok: true });
    expect(p.logs.filter((l) => l.scriptLog).map((l) => l.msg)).toEqual([expect.stringMatching(/^down: E(SOCKET|CONNECTION) permanent=false$/), 'down: SMTPMUX_DOWNSTREAM_COOLING permanent=false']);

    const w = await proxy(config(downstreams, 'waterfall.js'));
    for (let i = 0; i < 2; i++) expect(await sendWithNodemailer(w.port, { subject: `w${i}` })).toMatchObject({ ok: true });
    expect(outcomes(w).map((l) => l.attempts.map((a) => a.downstream))).toEqual([['down', 'good'], ['good']]);
    expect(w.logs.some((l) => l.scriptLog && /skipping down, cooling down until/.test(String(l.msg)))).toBe(true);
  });
});

describe('rate', () => {
  test('rate: 2/s paces six back-to-back messages: none refused, and they take at least ~2.5 s', async () => {
    const paced = await downstream();
    const p = await proxy(config([{ name: 'paced', addr: paced.addr, rate: '2/s' }]));
    const started = Date.now();
    for (let i = 0; i < 6; i++) expect(await sendWithNodemailer(p.port, { subject: `r${i}` })).toMatchObject({ ok: true, code: 250 });
    expect(Date.now() - started).toBeGreaterThanOrEqual(2400);
    expect(paced.received).toHaveLength(6);
  });

  test('a downstream at its rate with no slot within delivery.rate_wait_ms is skipped for the next one', async () => {
    const paced = await downstream();
    const other = await downstream();
    const p = await proxy(config([{ name: 'paced', addr: paced.addr, rate: '1/m' }, { name: 'other', addr: other.addr }], 'in-order.js', { rate_wait_ms: 200 }));
    for (let i = 0; i < 2; i++) expect(await sendWithNodemailer(p.port, { subject: `q${i}` })).toMatchObject({ ok: true });
    expect(outcomes(p)[1].attempts[0]).toMatchObject({ downstream: 'paced', skipped: 'rate', code: 'SMTPMUX_DOWNSTREAM_RATE' });
    expect([paced.received.length, other.received.length]).toEqual([1, 1]);
  });
});

describe('quota', () => {
  test('a quota of 3 lets exactly 3 accepted messages through, a failed attempt is not charged, and the next go to the other downstream', async () => {
    const limited = await downstream((n) => (n === 1 ? { kind: 'reply', code: 451, message: '4.3.0 Try again' } : undefined));
    const other = await downstream();
    const p = await proxy(config([{ name: 'limited', addr: limited.addr, quota: '3/1h' }, { name: 'other', addr: other.addr }]));
    for (let i = 0; i < 6; i++) expect(await sendWithNodemailer(p.port, { subject: `q${i}` })).toMatchObject({ ok: true });
    expect(limited.received.map((r) => subjectOf(r.raw))).toEqual(['q1', 'q2', 'q3']);
    expect(other.received.map((r) => subjectOf(r.raw))).toEqual(['q0', 'q4', 'q5']);
    expect(outcomes(p)[4].attempts[0]).toMatchObject({ downstream: 'limited', skipped: 'quota', code: 'SMTPMUX_DOWNSTREAM_QUOTA', until: expect.any(String) });
  });

  test('count: recipients charges a message by its recipients, and nothing left anywhere is 451 4.4.1 naming the quota', async () => {
    const a = await downstream();
    const b = await downstream();
    const p = await proxy(config([{ name: 'a', addr: a.addr, quota: '3/1d', count: 'recipients' }, { name: 'b', addr: b.addr, quota: '2/1d', count: 'recipients' }]));
    const two = ['x@example.org', 'y@example.org'];
    expect(await sendWithNodemailer(p.port, { subject: 'two-a', to: two })).toMatchObject({ ok: true }); // a: 2 of 3
    expect(await sendWithNodemailer(p.port, { subject: 'two-b', to: two })).toMatchObject({ ok: true }); // a full for 2: b, 2 of 2
    expect(await sendWithNodemailer(p.port, { subject: 'one-a' })).toMatchObject({ ok: true }); // a: 3 of 3
    const none = await sendWithNodemailer(p.port, { subject: 'none' });
    expect(none).toMatchObject({ ok: false, code: 451 });
    expect(none.response).toMatch(/4\.4\.1 .*a: out of quota until .*b: out of quota until/);
    expect(a.received.map((r) => subjectOf(r.raw))).toEqual(['two-a', 'one-a']);
    expect(b.received.map((r) => subjectOf(r.raw))).toEqual(['two-b']);
  });

  test('quota-aware.js reads quota.remaining: the downstream with the most remaining goes first', async () => {
    const a = await downstream();
    const b = await downstream();
    const p = await proxy(config([{ name: 'a', addr: a.addr, quota: '2/1h' }, { name: 'b', addr: b.addr, quota: '3/1h' }], 'quota-aware.js'));
    for (let i = 0; i < 5; i++) expect(await sendWithNodemailer(p.port, { subject: `m${i}` })).toMatchObject({ ok: true });
    // remaining (a, b): (2,3) → b, (2,2) → a, (1,2) → b, (1,1) → a, (0,1) → b
    expect(outcomes(p).map((l) => l.downstream)).toEqual(['b', 'a', 'b', 'a', 'b']);
    expect(outcomes(p).every((l) => l.attempts.length === 1)).toBe(true);
  });
});

test('a selector sees each downstream\'s state, failures, last error, quota, rate and inflight, never credentials', async () => {
  const good = await downstream();
  const down = await deadPort();
  const script = `function select(message, downstreams) {
  for (const d of downstreams) log(JSON.stringify({ name: d.name, state: d.state, failures: d.failures, lastError: d.lastError, quota: d.quota, rate: d.rate, inflight: d.inflight, cooling: d.cooldownUntil !== null }));
  return downstreams;
}\n`;
  const p = await proxy(
    config(
      [
        { name: 'down', addr: `127.0.0.1:${down}`, cooldown: '30s', user: 'relay-user', pass: 'relay-secret' },
        { name: 'good', addr: good.addr, quota: '10/1h', rate: '100/s' },
      ],
      'show.js',
    ),
    { 'show.js': script },
  );
  for (let i = 0; i < 2; i++) expect(await sendWithNodemailer(p.port, { subject: `v${i}` })).toMatchObject({ ok: true });
  const seen = p.logs.filter((l) => l.scriptLog).map((l) => JSON.parse(String(l.msg)));
  expect(seen[0]).toEqual({ name: 'down', state: 'up', failures: 0, lastError: null, quota: null, rate: null, inflight: 0, cooling: false });
  expect(seen[1]).toEqual({ name: 'good', state: 'up', failures: 0, lastError: null, quota: { limit: 10, used: 0, remaining: 10, resetsAt: null }, rate: { limit: 100, per: 1000, available: expect.any(Number) }, inflight: 0, cooling: false });
  expect(seen[2]).toMatchObject({ name: 'down', state: 'cooling', failures: 1, lastError: { code: expect.stringMatching(REFUSED) }, cooling: true });
  expect(seen[3]).toMatchObject({ name: 'good', quota: { used: 1, remaining: 9, resetsAt: expect.any(Number) } });
  expect(p.logText()).not.toMatch(/relay-secret/);
});

test('smtpmux try shows the downstreams it skipped and why', async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'smtpmux-try-'));
  open.push({ close: async () => rmSync(dir, { recursive: true, force: true }) });
  const file = path.join(dir, 'try.yaml');
  writeFileSync(file, config([{ name: 'a', addr: '127.0.0.1:2501', cooldown: '1m' }, { name: 'b', addr: '127.0.0.1:2502' }], 'round-robin.js'));
  const result = await runCli(['try', '--config', file, '--fail', 'a', '--times', '3']);
  expect(result.stdout).toMatch(/message 1:[\s\S]*tried a: ECONNECTION[\s\S]*a cools down until/);
  expect(result.stdout).toMatch(/message 3:[\s\S]*skipped a: cooling down until \S+[\s\S]*tried b: accepted/);
});

test('a script that sends to its only downstream while it cools is refused at once, then probes it once a base cooldown has passed', async () => {
  let failing = true;
  const flaky = await downstream(() => (failing ? THROTTLED : undefined));
  const p = await proxy(config([{ name: 'flaky', addr: flaky.addr, cooldown: '800ms', cooldown_max: '1m' }], 'waterfall.js'));
  expect(await sendWithNodemailer(p.port, { subject: 'fails' })).toMatchObject({ ok: false, code: 451 });
  await sleep(900);
  expect(await sendWithNodemailer(p.port, { subject: 'fails again' })).toMatchObject({ ok: false, code: 451 }); // cools 1.6 s now
  // Just contacted: waterfall.js sends to the one that recovers first, and the host refuses it at once.
  expect(await sendWithNodemailer(p.port, { subject: 'refused' })).toMatchObject({ ok: false, code: 451 });
  expect(outcomes(p)[2].attempts).toEqual([expect.objectContaining({ downstream: 'flaky', skipped: 'cooling', code: 'SMTPMUX_DOWNSTREAM_COOLING' })]);
  failing = false;
  await sleep(900);
  // Still cooling, but a base cooldown since the last contact: the script's send() is let through as a probe.
  expect(await sendWithNodemailer(p.port, { subject: 'probe' })).toMatchObject({ ok: true, code: 250 });
  expect(outcomes(p)[3].attempts).toEqual([expect.objectContaining({ downstream: 'flaky', ok: true, probe: true })]);
  expect(flaky.offered()).toBe(3);
});

test('a downstream\'s state key cannot be spelled by another user and downstream: the parts are escaped', () => {
  expect(stateKey('a@x:b', { name: 'c', account: undefined })).not.toBe(stateKey('a@x', { name: 'b:c', account: undefined }));
  expect(stateKey('App@Example.com', { name: 'ses', account: undefined })).toBe('user:app@example.com:ses');
  expect(stateKey('a', { name: 'b', account: 'acct:1' })).toBe('account:acct%3A1');
});
