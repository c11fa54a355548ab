// Hostile input, contained: a selector that rewrites the built-ins the sandbox bootstrap relies on, floods
// the send() bridge, returns enormous strings or hides a looping getter; a client that vanishes in the
// middle of a large DATA. Each costs at most its own message; the proxy keeps serving and leaks nothing.
import { readdirSync, readlinkSync } from 'node:fs';
import { plainAuth, connectRaw } from './support/raw';
import { startDownstream, type Downstream } from './support/downstream';
import { testConfig } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { sendWithNodemailer } from './support/clients';
import { SelectorSandbox } from '../src/selector/sandbox';

const LIMITS = {
  limits: { selector_timeout_ms: 1500, selector_memory_mb: 32, max_sends: 3 },
  delivery: { connect_timeout_ms: 1000, socket_timeout_ms: 5000 },
};

function config(good: Downstream, selector = 'hostile.js'): string {
  return testConfig({ ...LIMITS, selector, downstreams: [{ name: 'good', addr: good.addr }] });
}

/** Each subject picks a way to break the bootstrap's assumptions; "fine" routes normally. */
const HOSTILE = String.raw`
function select(message, downstreams) {
  switch (message.subject) {
    case 'string-and-stack':
      String = (v) => v;
      { const e = new Error('x'); e.stack = 42; throw e; }
    case 'then-hook':
      Object.prototype.then = function (resolve) { delete Object.prototype.then; resolve(null); };
      return undefined;
    case 'map-hook':
      Array.prototype.map = function () { return {}; };
      Object.prototype.findIndex = () => -1;
      return ['good'];
    case 'send-flood':
      for (let i = 0; i < 200000; i++) send('nope').catch(() => {});
      return 'flooded';
    case 'huge-reason': {
      let s = 'x';
      for (let i = 0; i < 24; i++) s += s;
      return s;
    }
    case 'huge-log': {
      String.prototype.slice = function () { 'use strict'; return this; };
      let s = 'y';
      for (let i = 0; i < 22; i++) s += s;
      for (let i = 0; i < 50; i++) log(s);
      return ['good'];
    }
    default:
      return ['good'];
  }
}
`;

describe('hostile selectors', () => {
  let good: Downstream;
  let proxy: RunningProxy;
  beforeAll(async () => {
    good = await startDownstream();
    proxy = await startProxy({ 'config.yaml': config(good), 'hostile.js': HOSTILE });
  });
  afterAll(async () => {
    await proxy?.stop();
    await good?.close();
  });

  test('a selector that replaces Array.prototype.map and Object.prototype.findIndex still has its list honoured', async () => {
    expect(await sendWithNodemailer(proxy.port, { subject: 'map-hook' })).toMatchObject({ ok: true });
  });

  test.each(['string-and-stack', 'then-hook', 'send-flood', 'huge-reason'])(
    'a selector doing "%s" gets its message a 4xx, and the next message still goes through',
    async (subject) => {
      const started = Date.now();
      const hostile = await sendWithNodemailer(proxy.port, { subject });
      expect(hostile.ok).toBe(false);
      expect(hostile.code).toBe(451);
      expect(Date.now() - started).toBeLessThan(5000);
      const before = good.received.length;
      expect(await sendWithNodemailer(proxy.port, { subject: 'fine' })).toMatchObject({ ok: true });
      expect(good.received.length).toBe(before + 1);
    },
  );

  test('log lines and replies stay bounded whatever size of string a selector produces', async () => {
    const sent = await sendWithNodemailer(proxy.port, { subject: 'huge-log' });
    expect(sent.ok).toBe(true);
    const longest = Math.max(...proxy.logText().split('\n').map((line) => line.length));
    expect(longest).toBeLessThan(20_000);
  });
});

describe('hostile load-time code', () => {
  test('a select getter that never returns fails the load within the selector timeout', async () => {
    const started = Date.now();
    const load = SelectorSandbox.fromSource('/virtual/getter.js', "Object.defineProperty(globalThis, 'select', { get() { for (;;) {} } });", {
      timeoutMs: 500,
      memoryMb: 16,
    });
    await expect(load).rejects.toThrow(/did not finish loading within 500 ms/);
    expect(Date.now() - started).toBeLessThan(5000);
  });
});

describe('clients that go away', () => {
  let good: Downstream;
  let proxy: RunningProxy;
  beforeAll(async () => {
    good = await startDownstream();
    proxy = await startProxy({ 'config.yaml': config(good, 'round-robin.js') });
  });
  afterAll(async () => {
    await proxy?.stop();
    await good?.close();
  });

  const spillFiles = (): string[] =>
    readdirSync('/proc/self/fd')
      .map((fd) => {
        try {
          return readlinkSync(`/proc/self/fd/${fd}`);
        } catch {
          return '';
        }
      })
      .filter((target) => target.includes('message.eml'));

  test('a client that drops the connection in the middle of a large DATA leaves no temp file and no open fd', async () => {
    const chunk = Buffer.alloc(256 * 1024, 'a');
    for (let i = 0; i < 10; i++) {
      const raw = await connectRaw(proxy.port);
      await raw.command('EHLO test');
      await raw.command(`AUTH PLAIN ${plainAuth('test@user.com', 'password123')}`);
      await raw.command('MAIL FROM:<a@example.com>');
      await raw.command('RCPT TO:<b@example.org>');
      expect((await raw.command('DATA')).code).toBe(354);
      // Past the 1 MiB spill threshold (the body goes to a temp file), then gone without the final dot.
      await new Promise<void>((resolve) => {
        let sent = 0;
        const write = (): void => {
          if (sent++ >= 6 + (i % 3)) return resolve();
          raw.write(chunk);
          setImmediate(write);
        };
        write();
      });
      await new Promise((r) => setTimeout(r, 30 * (i % 4)));
      raw.close();
    }
    // The proxy notices each close and cleans up; give it a bounded moment.
    const deadline = Date.now() + 5000;
    const leftovers = (): string[] => readdirSync(proxy.dir).filter((name) => name.startsWith('smtpmux-'));
    while ((leftovers().length > 0 || spillFiles().length > 0) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    expect(leftovers()).toEqual([]);
    expect(spillFiles()).toEqual([]);
    expect(await sendWithNodemailer(proxy.port, { subject: 'after the aborts' })).toMatchObject({ ok: true });
  });
});
