// Each deadline protects one thing. A message's wall clock passing while its script only waits on a
// send() gives up on that run alone: the isolate, its module state and the other messages inside it
// carry on, and the delivery latch decides the abandoned message's reply. Script code that computes too
// long in one go is what costs an isolate (tests/hostile.test.ts and tests/sandbox.test.ts show that).
import { startDownstream, subjectOf, type Downstream } from './support/downstream';
import { startProxy, type RunningProxy } from './support/proxy';
import { testConfig } from './support/config';
import { sendWithNodemailer } from './support/clients';

/** A waterfall with a module counter: the counter tells whether the isolate was rebuilt. */
const COUNTING_WATERFALL = String.raw`
let count = 0;
async function select(message, downstreams, ctx) {
  count++;
  ctx.log('count=' + count + ' ' + message.subject);
  let last;
  for (const ds of downstreams) {
    try {
      await ctx.send(ds);
      return;
    } catch (err) {
      last = err;
    }
  }
  throw last;
}
`;

describe('a message whose downstream hangs past the selector deadline', () => {
  let first: Downstream, backup: Downstream;
  let proxy: RunningProxy;
  const STALL_MS = 2500;
  const TIMEOUT_MS = 700;

  beforeAll(async () => {
    // The first downstream sits on the message called "hang" well past the selector deadline, then accepts it.
    first = await startDownstream({ decide: (raw) => (subjectOf(raw) === 'hang' ? { kind: 'stall', ms: STALL_MS } : undefined) });
    backup = await startDownstream();
    proxy = await startProxy({
      'waterfall.js': COUNTING_WATERFALL,
      'config.yaml': testConfig({
        limits: { selector_timeout_ms: TIMEOUT_MS, selector_memory_mb: 32 },
        delivery: { connect_timeout_ms: 1000, socket_timeout_ms: 5000, max_connections: 10 },
        selector: 'waterfall.js',
        downstreams: [
          { name: 'first', addr: first.addr },
          { name: 'backup', addr: backup.addr },
        ],
      }),
    });
  });
  afterAll(async () => {
    await proxy?.stop();
    for (const ds of [first, backup]) await ds?.close();
  });

  test('costs only that message: five others of the same user go through meanwhile, module state lives on, the hung one is delivered at most once', async () => {
    const started = Date.now();
    const hung = sendWithNodemailer(proxy.port, { subject: 'hang' }).then((r) => ({ ...r, at: Date.now() - started }));
    // Wait until the hung message's run is inside the isolate, waiting on its send().
    while (!proxy.logs.some((l) => l.msg === 'count=1 hang')) await new Promise((r) => setTimeout(r, 10));
    const others = await Promise.all([1, 2, 3, 4, 5].map((i) => sendWithNodemailer(proxy.port, { subject: `other ${i}` })));
    for (const r of others) expect(r).toMatchObject({ ok: true, code: 250 });

    const result = await hung;
    // The downstream accepted it in the end: the latch says 250, after the selector had been given up on.
    expect(result).toMatchObject({ ok: true, code: 250 });
    expect(result.at).toBeGreaterThanOrEqual(STALL_MS - 100);
    const line = proxy.logs.find((l) => typeof l.outcome === 'string' && l.downstream === 'first' && (l.selectorResult as { kind: string }).kind === 'fault')!;
    expect(line).toMatchObject({ outcome: 'delivered', selectorResult: { kind: 'fault', fault: 'timeout' } });
    expect(line.attempts).toEqual([expect.objectContaining({ downstream: 'first', ok: true })]);

    // Module state was not reset: the counter keeps counting in the same isolate.
    expect(await sendWithNodemailer(proxy.port, { subject: 'after' })).toMatchObject({ ok: true });
    const counts = proxy.logs.filter((l) => l.scriptLog === true).map((l) => String(l.msg));
    expect(counts[0]).toBe('count=1 hang');
    expect(counts.map((c) => Number(/^count=(\d+)/.exec(c)?.[1]))).toEqual([1, 2, 3, 4, 5, 6, 7]);
    expect(counts[6]).toBe('count=7 after');

    // Delivered once, where it was first sent: the abandoned run did not go on to the backup.
    const subjects = first.received.map((r) => subjectOf(r.raw));
    expect(subjects.filter((s) => s === 'hang')).toHaveLength(1);
    expect(backup.received).toEqual([]);
  });
});

describe('a run abandoned at its deadline', () => {
  test('its queued sends are not made: the client waits for the attempt in flight, not for every send() the script fired', async () => {
    const { startMisbehaving } = await import('./support/misbehaving');
    const silent = await startMisbehaving(() => 'hang-after-data');
    // Three sends fired at once, none awaited, then the script waits for ever: only the first may run.
    const proxy = await startProxy({
      'fire.js': String.raw`
        function select(message, downstreams, ctx) {
          for (let i = 0; i < 3; i++) ctx.send('silent').catch(() => undefined);
          return new Promise(() => undefined);
        }`,
      'config.yaml': testConfig({
        limits: { selector_timeout_ms: 500, selector_memory_mb: 32 },
        delivery: { connect_timeout_ms: 1000, socket_timeout_ms: 30_000, attempt_timeout_ms: 2000, max_connections: 3 },
        selector: 'fire.js',
        downstreams: [{ name: 'silent', addr: silent.addr }],
      }),
    });
    try {
      const sent = await sendWithNodemailer(proxy.port, { subject: 'fired' });
      expect(sent).toMatchObject({ ok: false, code: 451 });
      const line = proxy.logs.find((l) => l.outcome === 'deferred') as { attempts: { code?: string }[]; problems?: string[] };
      // One attempt ran into its deadline; the two queued behind it were refused, never contacted.
      expect(line.attempts).toEqual([expect.objectContaining({ downstream: 'silent', ok: false, code: 'ETIMEDOUT' })]);
      expect(line.problems).toEqual(['The selector run for this message is over', 'The selector run for this message is over']);
      expect(silent.connections()).toBe(1);
    } finally {
      await proxy.stop();
      await silent.close();
    }
  });
});
