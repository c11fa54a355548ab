// max_message_size follows a reload at once: the advertised SIZE, the MAIL FROM SIZE= check and the
// transfer itself all use the new limit, so a message the new limit allows is never refused for good.
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { connectRaw, plainAuth } from './support/raw';
import { startDownstream, type Downstream } from './support/downstream';
import { testConfig } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { sendWithNodemailer } from './support/clients';

describe('max_message_size on reload', () => {
  let ds: Downstream;
  let proxy: RunningProxy;
  beforeAll(async () => {
    ds = await startDownstream();
    proxy = await startProxy({ 'config.yaml': testConfig({ selector: 'round-robin.js', downstreams: [{ addr: ds.addr }], max_message_size: '1MB' }) });
  });
  afterAll(async () => {
    await proxy?.stop();
    await ds?.close();
  });

  const big = (): Buffer => Buffer.alloc(2 * 1024 * 1024, 'b');

  test('a 2 MB message is refused with 552 5.3.4 under a 1 MB limit, and accepted once a reload raises it to 10 MB', async () => {
    const before = await sendWithNodemailer(proxy.port, { subject: 'too big', attachments: [{ filename: 'b.bin', content: big() }] });
    expect(before).toMatchObject({ ok: false, code: 552 });
    expect(before.response).toContain('5.3.4');

    const file = path.join(proxy.dir, 'config.yaml');
    writeFileSync(file, readFileSync(file, 'utf8').replace('max_message_size: 1MB', 'max_message_size: 10MB'));
    expect((await proxy.app.reload('test')).ok).toBe(true);

    const raw = await connectRaw(proxy.port);
    const ehlo = await raw.command('EHLO test');
    expect(ehlo.text).toContain(`SIZE ${10 * 1024 * 1024}`);
    expect((await raw.command(`AUTH PLAIN ${plainAuth('test@user.com', 'password123')}`)).code).toBe(235);
    expect((await raw.command(`MAIL FROM:<a@example.com> SIZE=${3 * 1024 * 1024}`)).code).toBe(250);
    raw.close();

    const after = await sendWithNodemailer(proxy.port, { subject: 'fits now', attachments: [{ filename: 'b.bin', content: big() }] });
    expect(after).toMatchObject({ ok: true });
    expect(ds.received).toHaveLength(1);
  });
});
