// TLS towards downstreams: in the default `auto` mode a downstream password never crosses in the clear
// unless the downstream is on loopback (or `tls: none` says so).
import { startDownstream, type Downstream } from './support/downstream';
import { testConfig } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { sendWithNodemailer } from './support/clients';

function config(addr: string, tls: string): string {
  return testConfig({
    delivery: { connect_timeout_ms: 2000, socket_timeout_ms: 5000 },
    selector: 'round-robin.js',
    downstreams: [{ name: 'relay', addr, user: 'relay-user', pass: 'relay-secret', tls }],
  });
}

describe('downstream TLS', () => {
  let relay: Downstream;
  const proxies: RunningProxy[] = [];
  beforeAll(async () => {
    relay = await startDownstream({ user: 'relay-user', pass: 'relay-secret' });
  });
  afterAll(async () => {
    for (const p of proxies) await p.stop();
    await relay.close();
  });

  test('auto mode refuses to send a password in the clear to a downstream that is not on loopback by name, and the client gets 451', async () => {
    // An IPv4-mapped IPv6 address reaches the loopback test server but is not a loopback name:
    // it stands for a remote server that offers no STARTTLS.
    const p = await startProxy({ 'config.yaml': config(`[::ffff:127.0.0.1]:${relay.port}`, 'auto') });
    proxies.push(p);
    const sent = await sendWithNodemailer(p.port, { subject: 'no plaintext password' });
    expect(sent.ok).toBe(false);
    expect(sent.code).toBe(451);
    expect(relay.received).toHaveLength(0);
    expect(relay.authFailures()).toBe(0);
  });

  test('auto mode logs in without TLS to a downstream on loopback, and tls: none allows it anywhere', async () => {
    for (const [addr, tls] of [[`127.0.0.1:${relay.port}`, 'auto'], [`[::ffff:127.0.0.1]:${relay.port}`, 'none']]) {
      const p = await startProxy({ 'config.yaml': config(addr, tls) });
      proxies.push(p);
      const sent = await sendWithNodemailer(p.port, { subject: `plain ${tls}` });
      expect(sent).toMatchObject({ ok: true });
    }
    expect(relay.received.map((m) => m.user)).toEqual(['relay-user', 'relay-user']);
  });
});
