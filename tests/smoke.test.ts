import { startDownstream, type Downstream } from './support/downstream';
import { testConfig } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { sendWithNodemailer, swaks } from './support/clients';

describe('smoke', () => {
  let a: Downstream, b: Downstream, proxy: RunningProxy;
  beforeAll(async () => {
    a = await startDownstream({ user: 'ua', pass: 'pa' });
    b = await startDownstream();
    proxy = await startProxy({ 'config.yaml': testConfig({ selector: 'round-robin.js', downstreams: [{ name: 'a', addr: a.addr, user: 'ua', pass: 'pa' }, { name: 'b', addr: b.addr }] }) });
  });
  afterAll(async () => {
    await proxy?.stop();
    await a?.close();
    await b?.close();
  });
  test('round robin over two', async () => {
    for (let i = 0; i < 4; i++) {
      const r = await sendWithNodemailer(proxy.port, { subject: `n${i}` });
      expect(r).toMatchObject({ ok: true });
    }
    const s = await swaks(proxy.port);
    expect(s.code).toBe(0);
    expect(a.received.length + b.received.length).toBe(5);
    expect(Math.abs(a.received.length - b.received.length)).toBe(1);
  });
});
