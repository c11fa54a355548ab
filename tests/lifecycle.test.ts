// One lifecycle: parts start in order and close in reverse (fastify's onClose), a failed start closes
// what had started, and the App owns its config watcher and drains in-flight messages on a promise.
import net from 'node:net';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { Writable } from 'node:stream';
import { Lifecycle, type Part } from '../src/lifecycle';
import { testConfig } from './support/config';
import { startDownstream, type Downstream } from './support/downstream';
import { startProxy } from './support/proxy';
import { startWatched, tempDir, until, waitForLog, isReloaded, fixedSelector, writeIn } from './support/reload';
import { sendWithNodemailer } from './support/clients';
import { App } from '../src/app';
import { createLogger, type Logger } from '../src/observe/logger';

function recorder(): { events: string[]; part(name: string, fail?: 'start' | 'close'): Part } {
  const events: string[] = [];
  return {
    events,
    part: (name, fail) => ({
      name,
      start: async () => {
        events.push(`start ${name}`);
        if (fail === 'start') throw new Error(`${name} cannot start`);
      },
      close: async () => {
        events.push(`close ${name}`);
        if (fail === 'close') throw new Error(`${name} cannot close`);
      },
    }),
  };
}

describe('Lifecycle', () => {
  test('parts close in reverse order of start; one that fails to close does not stop the others', async () => {
    const { events, part } = recorder();
    const failures: string[] = [];
    const lifecycle = new Lifecycle((p) => failures.push(p.name));
    await lifecycle.start([part('a'), part('b', 'close'), part('c')]);
    await lifecycle.close();
    expect(events).toEqual(['start a', 'start b', 'start c', 'close c', 'close b', 'close a']);
    expect(failures).toEqual(['b']);
  });

  test('a part that fails to start closes the ones already started, and the error reaches the caller', async () => {
    const { events, part } = recorder();
    const lifecycle = new Lifecycle(() => undefined);
    await expect(lifecycle.start([part('a'), part('b'), part('c', 'start'), part('d')])).rejects.toThrow('c cannot start');
    expect(events).toEqual(['start a', 'start b', 'start c', 'close b', 'close a']);
  });
});

describe('App lifecycle', () => {
  let ds: Downstream;
  beforeAll(async () => {
    ds = await startDownstream();
  });
  afterAll(async () => {
    await ds.close();
  });

  test('a port already in use rejects start with EADDRINUSE', async () => {
    const blocker = net.createServer();
    await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', () => resolve()));
    const port = (blocker.address() as net.AddressInfo).port;
    const dir = tempDir();
    writeIn(dir, 'config.yaml', testConfig({ listen: { port }, selector: 'round-robin.js', downstreams: [{ name: 'a', addr: ds.addr }] }));
    try {
      await expect(App.start({ configPath: path.join(dir, 'config.yaml'), env: {}, watch: false, logger: quietLogger() })).rejects.toMatchObject({ code: 'EADDRINUSE' });
    } finally {
      await new Promise<void>((resolve) => blocker.close(() => resolve()));
    }
  });

  test('the App watches its own config: a saved selector reloads it, and after close nothing reloads', async () => {
    const dir = tempDir();
    writeIn(dir, 'sel.js', fixedSelector('a'));
    writeIn(dir, 'config.yaml', testConfig({ selector: 'sel.js', downstreams: [{ name: 'a', addr: ds.addr }] }));
    const p = await startWatched(dir);
    writeFileSync(path.join(dir, 'sel.js'), fixedSelector('a', 'saved again'));
    const { index } = await waitForLog(p.logs, 0, isReloaded, 'a reload after the save');
    await p.app.close();
    const after = p.logs.length;
    await p.app.reload('after close');
    expect(p.logs.slice(after).some(isReloaded)).toBe(false);
    expect(index).toBeGreaterThan(0);
    await p.stop();
  });

  test('close waits for the message in flight, then stops; a second close is the same close', async () => {
    const slow = await startDownstream({ fail: { kind: 'stall', ms: 1500 } });
    const proxy = await startProxy({ 'config.yaml': testConfig({ selector: 'round-robin.js', downstreams: [{ name: 'slow', addr: slow.addr }] }) });
    try {
      const sending = sendWithNodemailer(proxy.port, { subject: 'in flight' });
      // The proxy connects to the downstream only once the message is in flight.
      await until(() => slow.connections() > 0, 'the proxy to connect downstream');
      const first = proxy.app.close();
      expect(proxy.app.close()).toBe(first);
      await first;
      expect((await sending).code).toBe(250);
      expect(slow.received).toHaveLength(1);
    } finally {
      await proxy.stop();
      await slow.close();
    }
  });
});

function quietLogger(): Logger {
  return createLogger({ destination: new Writable({ write: (_chunk, _encoding, done) => done() }) });
}
