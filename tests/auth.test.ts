// Inbound SMTP: who may send (AUTH PLAIN and LOGIN against the configured users, nothing without AUTH,
// no plaintext AUTH unless allowed) and how big a message may be.
import { startDownstream, type Downstream } from './support/downstream';
import { testConfig } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { sendWithNodemailer, swaks } from './support/clients';
import { connectRaw, plainAuth } from './support/raw';
import { LOGIN_PENALTY_DEFAULTS } from '../src/config/schema';

const AUTH_FAILURE_DELAY_MS = LOGIN_PENALTY_DEFAULTS.failure_delay_ms;

// Penalties start late here: this file's tests fail a few logins on purpose and time the answers.
const EXTRA = {
  max_message_size: '200KB',
  login_penalty: { free_failures: 20, lockout_failures: 40 },
  limits: { selector_timeout_ms: 1000, selector_memory_mb: 32 },
};

describe('inbound authentication and limits', () => {
  let ds: Downstream;
  let proxy: RunningProxy;

  beforeAll(async () => {
    ds = await startDownstream();
    proxy = await startProxy({ 'config.yaml': testConfig({ selector: 'round-robin.js', ...EXTRA, downstreams: [{ name: 'only', addr: ds.addr }] }) });
  });
  afterAll(async () => {
    await proxy?.stop();
    await ds?.close();
  });
  beforeEach(() => ds.received.splice(0));

  test('a bad password gets 535 5.7.8 and nothing is sent', async () => {
    const sent = await sendWithNodemailer(proxy.port, { subject: 'bad password' }, { user: 'test@user.com', pass: 'not-the-password' });
    expect(sent.ok).toBe(false);
    expect(sent.code).toBe(535);
    expect(sent.response).toMatch(/^535 5\.7\.8 /);
    expect(ds.received).toHaveLength(0);
    expect(proxy.logs.some((l) => l.msg === 'authentication failed' && l.login === 'test@user.com')).toBe(true);
  });

  test('an unknown user gets 535 5.7.8', async () => {
    const smtp = await connectRaw(proxy.port);
    try {
      await smtp.command('EHLO client.example');
      const reply = await smtp.command(`AUTH PLAIN ${plainAuth('nobody@user.com', 'password123')}`);
      expect(reply.code).toBe(535);
      expect(reply.text).toMatch(/^535 5\.7\.8 /);
    } finally {
      smtp.close();
    }
  });

  test('a failed login is answered only after a pause, which slows password guessing; a good one is answered at once', async () => {
    const [guesser, owner] = [await connectRaw(proxy.port), await connectRaw(proxy.port)];
    try {
      await guesser.command('EHLO client.example');
      await owner.command('EHLO client.example');
      const answered: string[] = [];
      const started = Date.now();
      const wrong = guesser.command(`AUTH PLAIN ${plainAuth('test@user.com', 'guess-1')}`).then((reply) => {
        answered.push('wrong');
        return { reply, ms: Date.now() - started };
      });
      const right = owner.command(`AUTH PLAIN ${plainAuth('test@user.com', 'password123')}`).then((reply) => {
        answered.push('right');
        return reply;
      });
      expect((await right).code).toBe(235);
      const failed = await wrong;
      expect(failed.reply.code).toBe(535);
      expect(failed.ms).toBeGreaterThanOrEqual(AUTH_FAILURE_DELAY_MS - 50);
      // Sent after the wrong guess, the good login was answered first: it did not wait out the pause.
      expect(answered).toEqual(['right', 'wrong']);
    } finally {
      guesser.close();
      owner.close();
    }
  });

  test('MAIL without AUTH gets 530 5.7.0', async () => {
    const smtp = await connectRaw(proxy.port);
    try {
      const ehlo = await smtp.command('EHLO client.example');
      expect(ehlo.text).toMatch(/AUTH PLAIN LOGIN/);
      const reply = await smtp.command('MAIL FROM:<app@example.com>');
      expect(reply.code).toBe(530);
      expect(reply.text).toMatch(/^530 5\.7\.0 /);
    } finally {
      smtp.close();
    }
    const sent = await sendWithNodemailer(proxy.port, { subject: 'no auth' }, null);
    expect(sent).toMatchObject({ ok: false, code: 530 });
    expect(ds.received).toHaveLength(0);
  });

  test('AUTH PLAIN logs in and the message is delivered', async () => {
    const result = await swaks(proxy.port, ['-a', 'PLAIN', '--header', 'Subject: plain login']);
    expect(result.code).toBe(0);
    expect(result.stdout).toMatch(/235 /);
    expect(ds.received).toHaveLength(1);
  });

  test('AUTH LOGIN logs in and the message is delivered', async () => {
    const result = await swaks(proxy.port, ['-a', 'LOGIN', '--header', 'Subject: login login']);
    expect(result.code).toBe(0);
    expect(result.stdout).toMatch(/AUTH LOGIN/);
    expect(result.stdout).toMatch(/235 /);
    expect(ds.received).toHaveLength(1);
  });

  test('AUTH LOGIN with a bad password gets 535 5.7.8', async () => {
    const result = await swaks(proxy.port, ['-a', 'LOGIN', '--auth-password', 'wrong']);
    expect(result.code).not.toBe(0);
    expect(result.stdout).toMatch(/535 5\.7\.8 /);
    expect(ds.received).toHaveLength(0);
  });

  test('a message over max_message_size gets 552 5.3.4 after DATA, and the same connection then sends the next message', async () => {
    const smtp = await connectRaw(proxy.port);
    try {
      await smtp.command('EHLO client.example');
      expect((await smtp.command(`AUTH PLAIN ${plainAuth('test@user.com', 'password123')}`)).code).toBe(235);
      // No SIZE= on MAIL FROM: the limit must be enforced on the transfer itself.
      const big = `Subject: too big\r\n\r\n${'x'.repeat(998)}\r\n`.repeat(300);
      expect(big.length).toBeGreaterThan(200 * 1024);
      const tooBig = await smtp.sendMessage({ body: big });
      expect(tooBig.code).toBe(552);
      expect(tooBig.text).toMatch(/^552 5\.3\.4 /);
      const next = await smtp.sendMessage({ body: 'Subject: small\r\n\r\nsmall enough\r\n' });
      expect(next.code).toBe(250);
    } finally {
      smtp.close();
    }
    expect(ds.received).toHaveLength(1);
    expect(ds.received[0].raw.toString()).toBe('Subject: small\r\n\r\nsmall enough\r\n');
  });

  test('a message over max_message_size is refused when MAIL FROM declares its SIZE, and the proxy serves the next message', async () => {
    const smtp = await connectRaw(proxy.port);
    try {
      const ehlo = await smtp.command('EHLO client.example');
      expect(ehlo.text).toMatch(/SIZE 204800/);
      expect((await smtp.command(`AUTH PLAIN ${plainAuth('test@user.com', 'password123')}`)).code).toBe(235);
      const mail = await smtp.command('MAIL FROM:<app@example.com> SIZE=300000');
      expect(mail.code).toBe(552);
    } finally {
      smtp.close();
    }
    const attachment = Buffer.alloc(300 * 1024, 'a');
    const sent = await sendWithNodemailer(proxy.port, { subject: 'big attachment', attachments: [{ filename: 'a.txt', content: attachment }] });
    expect(sent).toMatchObject({ ok: false, code: 552 });
    expect(await sendWithNodemailer(proxy.port, { subject: 'after the big one' })).toMatchObject({ ok: true });
    expect(ds.received).toHaveLength(1);
  });
});

describe('plaintext AUTH', () => {
  let ds: Downstream;
  const proxies: RunningProxy[] = [];
  const config = (): string =>
    testConfig({ selector: 'round-robin.js', ...EXTRA, allow_insecure_auth: false, downstreams: [{ name: 'only', addr: ds.addr }] });

  beforeAll(async () => {
    ds = await startDownstream();
  });
  afterAll(async () => {
    for (const p of proxies) await p.stop();
    await ds?.close();
  });

  test('with allow_insecure_auth false, AUTH on a plaintext connection is refused with 538', async () => {
    const proxy = await startProxy({ 'config.yaml': config() });
    proxies.push(proxy);
    const smtp = await connectRaw(proxy.port);
    try {
      await smtp.command('EHLO client.example');
      const reply = await smtp.command(`AUTH PLAIN ${plainAuth('test@user.com', 'password123')}`);
      expect(reply.code).toBe(538);
      expect(reply.text).toMatch(/^538 5\.7\.11 /);
      // Still not logged in.
      expect((await smtp.command('MAIL FROM:<app@example.com>')).code).toBe(530);
    } finally {
      smtp.close();
    }
    const login = await swaks(proxy.port, ['-a', 'LOGIN']);
    expect(login.code).not.toBe(0);
    expect(login.stdout).toMatch(/538 5\.7\.11 /);
    expect(ds.received).toHaveLength(0);
    expect(proxy.logs.some((l) => l.level === 40 && String(l.msg).includes('allow_insecure_auth is off'))).toBe(true);
  });

  test('USE_INSECURE_AUTH=true allows plaintext AUTH, as in the original', async () => {
    const proxy = await startProxy({ 'config.yaml': config() }, { env: { USE_INSECURE_AUTH: 'true' } });
    proxies.push(proxy);
    expect(await sendWithNodemailer(proxy.port, { subject: 'insecure allowed' })).toMatchObject({ ok: true });
    expect(ds.received).toHaveLength(1);
  });
});
