// Several messages of one user inside one selector isolate at once: send() finds its own message
// whatever style the script is written in, deliveries of a send()-driven script overlap, and a run
// killed for overrunning takes down only what it must (a message already delivered stays delivered).
import { SMTPServer } from 'smtp-server';
import { listenOnLoopback, type Listening } from './support/downstream';
import { testConfig } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { sendWithNodemailer } from './support/clients';

interface Sink extends Listening {
  readonly subjects: string[];
  /** Most messages this sink was receiving at the same moment. */
  readonly peak: () => number;
}

/** A downstream that takes `delayMs` to accept each message and records subjects and overlap. */
async function sink(delayMs: number, reply?: { code: number; text: string }): Promise<Sink> {
  const subjects: string[] = [];
  let inFlight = 0;
  let peak = 0;
  const server = new SMTPServer({
    authOptional: true,
    disabledCommands: ['STARTTLS'],
    logger: false,
    onData(stream, _session, callback) {
      inFlight++;
      peak = Math.max(peak, inFlight);
      const chunks: Buffer[] = [];
      stream.on('data', (c: Buffer) => chunks.push(c));
      stream.on('end', () => {
        setTimeout(() => {
          inFlight--;
          if (reply) return callback(Object.assign(new Error(reply.text), { responseCode: reply.code }));
          subjects.push(/^Subject: (.*)$/m.exec(Buffer.concat(chunks).toString())?.[1]?.trim() ?? '');
          callback(null, 'OK');
        }, delayMs);
      });
    },
  });
  return { ...(await listenOnLoopback(server)), subjects, peak: () => peak };
}

function config(sinks: Record<string, Sink>, timeoutMs = 3000): string {
  return testConfig({
    limits: { selector_timeout_ms: timeoutMs, selector_memory_mb: 32 },
    delivery: { connect_timeout_ms: 1000, socket_timeout_ms: 5000, max_connections: 10 },
    selector: 'styles.js',
    downstreams: Object.entries(sinks).map(([name, s]) => ({ name, addr: s.addr })),
  });
}

/** The subject says which downstream and which way of calling send(). */
const STYLES = String.raw`
async function viaHelper(name) {
  await send(name);
}
function select(message) {
  const [style, target] = message.subject.split(' ');
  switch (style) {
    case 'await':
      return (async () => { await send(target); })();
    case 'helper':
      return viaHelper(target);
    case 'then':
      return send('nowhere').then(() => 'unreachable', () => send(target)).then(() => undefined);
    case 'loop-after-failed-send':
      return (async () => { try { await send('bad'); } catch {} for (;;) {} })();
    default:
      return 'unknown style';
  }
}
`;

describe('concurrent messages in one selector isolate', () => {
  const open: { close(): Promise<void> }[] = [];
  let proxy: RunningProxy;
  afterEach(async () => {
    await proxy?.stop();
    for (const item of open.splice(0)) await item.close();
  });

  test('send() finds its own message whether the script awaits, awaits a helper or chains .then(), with many messages inside at once', async () => {
    const a = await sink(150);
    const b = await sink(150);
    const c = await sink(150);
    const nowhere = await sink(0, { code: 451, text: 'try later' });
    open.push(a, b, c, nowhere);
    proxy = await startProxy({ 'config.yaml': config({ a, b, c, nowhere }), 'styles.js': STYLES });
    const plan = ['await a', 'helper b', 'then c', 'then a', 'await b', 'helper c', 'await c', 'then b', 'helper a'];
    const results = await Promise.all(plan.map((subject) => sendWithNodemailer(proxy.port, { subject })));
    expect(results.map((r) => r.ok)).toEqual(plan.map(() => true));
    for (const [name, s] of Object.entries({ a, b, c })) {
      expect(s.subjects.sort()).toEqual(plan.filter((p) => p.endsWith(` ${name}`)).sort());
    }
    // The deliveries overlapped: the selector did not hold its isolate for one message at a time.
    expect(Math.max(a.peak(), b.peak(), c.peak())).toBeGreaterThan(1);
  });

  test('a run killed for looping takes its own message down; a message inside the same isolate whose send already succeeded still gets 250', async () => {
    const good = await sink(800);
    const bad = await sink(0, { code: 451, text: 'try later' });
    open.push(good, bad);
    proxy = await startProxy({ 'config.yaml': config({ good, bad }, 500), 'styles.js': STYLES });
    const [looping, delivered] = await Promise.all([
      sendWithNodemailer(proxy.port, { subject: 'loop-after-failed-send x' }),
      sendWithNodemailer(proxy.port, { subject: 'await good' }),
    ]);
    expect(looping).toMatchObject({ ok: false, code: 451 });
    expect(delivered).toMatchObject({ ok: true });
    expect(good.subjects).toEqual(['await good']);
    // And the rebuilt isolate serves the next message.
    expect(await sendWithNodemailer(proxy.port, { subject: 'helper good' })).toMatchObject({ ok: true });
  });
});
