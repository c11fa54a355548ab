// One delivery attempt is bounded by a wall-clock deadline (delivery.attempt_timeout_ms), whatever the
// downstream trickles, and its pooled connection is freed; a downstream that refuses us in its greeting
// is a temporary failure of that downstream, never a bounce of the message.
import { classifyFailure } from '../src/delivery/classify';
import { isLoopbackAddress } from '../src/delivery/pool';
import { startDownstream } from './support/downstream';
import { startMisbehaving, type Behaviour } from './support/misbehaving';
import { testConfig } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { sendWithNodemailer } from './support/clients';

const open: { close(): Promise<void> }[] = [];
afterEach(async () => {
  for (const item of open.splice(0).reverse()) await item.close();
});

// One pooled connection per downstream: a connection the first message left held would block the second.
const DEADLINE = {
  limits: { selector_timeout_ms: 5000 },
  delivery: { connect_timeout_ms: 1000, socket_timeout_ms: 30000, attempt_timeout_ms: 1500, max_connections: 1 },
};

async function proxyFor(downstreams: { name: string; addr: string }[]): Promise<RunningProxy> {
  const p = await startProxy({ 'config.yaml': testConfig({ selector: 'round-robin.js', ...DEADLINE, downstreams }) });
  open.push({ close: () => p.stop() });
  return p;
}

async function misbehaving(first: Behaviour) {
  const ds = await startMisbehaving((n) => (n === 1 ? first : 'ok'));
  open.push(ds);
  return ds;
}

describe('attempt deadline', () => {
  for (const behaviour of ['trickle-ehlo', 'hang-after-data'] as const) {
    test(`a downstream that ${behaviour === 'trickle-ehlo' ? 'trickles 250- lines forever' : 'never answers the final dot'} costs one attempt its deadline, and the next message is not stuck behind it`, async () => {
      const ds = await misbehaving(behaviour);
      const p = await proxyFor([{ name: 'slow', addr: ds.addr }]);

      const started = Date.now();
      const first = await sendWithNodemailer(p.port, { subject: 'held' });
      const waited = Date.now() - started;
      expect(first).toMatchObject({ ok: false, code: 451 });
      expect(first.response).toMatch(/4\.4\.1/);
      // The deadline is 1.5 s; the socket timeout (30 s) would have been far later, the trickle never.
      expect(waited).toBeLessThan(10_000);
      const line = p.logs.find((l) => l.outcome === 'deferred') as { attempts: { code: string }[] };
      expect(line.attempts).toEqual([expect.objectContaining({ downstream: 'slow', ok: false, code: 'ETIMEDOUT' })]);

      // With one pooled connection, the second message gets through only if the first one's was freed.
      const second = await sendWithNodemailer(p.port, { subject: 'next' });
      expect(second).toMatchObject({ ok: true, code: 250 });
      expect(ds.accepted()).toBe(1);
      expect(ds.connections()).toBe(2);
    });
  }
});

describe('a refusal before the message', () => {
  test('a downstream greeting 554 is a temporary failure: the message fails over, and alone it gets 451, never a bounce', async () => {
    const blocked = await startMisbehaving(() => 'greet-554');
    open.push(blocked);
    const good = await startDownstream();
    open.push(good);

    const failover = await proxyFor([{ name: 'blocked', addr: blocked.addr }, { name: 'good', addr: good.addr }]);
    const sent = await sendWithNodemailer(failover.port, { subject: 'via good' });
    expect(sent).toMatchObject({ ok: true, code: 250 });
    expect(sent.response).toMatch(/via good/);
    expect(good.received).toHaveLength(1);

    const alone = await proxyFor([{ name: 'blocked', addr: blocked.addr }]);
    const deferred = await sendWithNodemailer(alone.port, { subject: 'blocked only' });
    expect(deferred).toMatchObject({ ok: false, code: 451 });
    expect(deferred.response).toMatch(/4\.4\.1/);
    const line = alone.logs.find((l) => l.outcome === 'deferred') as { attempts: { responseCode?: number; permanent?: boolean }[] };
    expect(line.attempts[0]).toMatchObject({ responseCode: 554, permanent: false });
  });

  test('only a 5xx to MAIL FROM, RCPT TO or DATA refuses the message permanently', () => {
    const failure = (code: string, response: string) => classifyFailure(Object.assign(new Error(response), { code, response, responseCode: Number(response.slice(0, 3)) }));
    expect(failure('EPROTOCOL', '554 5.7.1 client host blocked').permanent).toBe(false);
    expect(failure('EAUTH', '535 5.7.8 Authentication failed').permanent).toBe(false);
    expect(failure('EPROTOCOL', '550 EHLO refused').permanent).toBe(false);
    expect(failure('EENVELOPE', '550 5.1.1 No such user').permanent).toBe(true);
    expect(failure('EMESSAGE', '554 5.6.0 Message rejected').permanent).toBe(true);
    expect(failure('EENVELOPE', '503 5.5.1 Bad sequence').permanent).toBe(false);
  });
});

test('tls: auto counts only a loopback address as loopback, never a host name', () => {
  expect(isLoopbackAddress('127.0.0.1')).toBe(true);
  expect(isLoopbackAddress('127.10.20.30')).toBe(true);
  expect(isLoopbackAddress('::1')).toBe(true);
  expect(isLoopbackAddress('0:0:0:0:0:0:0:1')).toBe(true);
  expect(isLoopbackAddress('127.example.com')).toBe(false);
  expect(isLoopbackAddress('127.0.0.1.nip.io')).toBe(false);
  expect(isLoopbackAddress('localhost')).toBe(false);
  expect(isLoopbackAddress('::ffff:127.0.0.1')).toBe(false);
  expect(isLoopbackAddress('128.0.0.1')).toBe(false);
});
