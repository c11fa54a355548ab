// Login throttling across connections: wrong passwords from one address are answered ever more slowly,
// then refused with 4xx until the penalty expires; another address is unaffected; one connection gets
// at most 3 tries. The windows are short here (login_penalty in the config) so the test is quick.
import { startDownstream, type Downstream } from './support/downstream';
import { testConfig, TEST_LIMITS } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { swaks } from './support/clients';
import { connectRaw, plainAuth, type Reply } from './support/raw';
import { hashPassword } from '../src/auth/password';

const PENALTY = { failure_delay_ms: 50, free_failures: 2, max_delay_ms: 400, lockout_failures: 5, window_ms: 3000 };
// (Each refused connection takes ~100 ms, smtp-server's early-talker pause: the window outlasts the 20 tries.)

/** One login attempt on a new connection from `from`: the greeting when it refused us, else AUTH's reply. */
async function attempt(port: number, from: string, password: string): Promise<{ reply: Reply; ms: number; at: 'greeting' | 'auth' }> {
  const smtp = await connectRaw(port, 15_000, { localAddress: from });
  try {
    if (smtp.greeting.code !== 220) return { reply: smtp.greeting, ms: 0, at: 'greeting' };
    await smtp.command('EHLO client.example');
    const started = Date.now();
    const reply = await smtp.command(`AUTH PLAIN ${plainAuth('test@user.com', password)}`);
    return { reply, ms: Date.now() - started, at: 'auth' };
  } finally {
    smtp.close();
  }
}

describe('login penalties', () => {
  let ds: Downstream;
  let proxy: RunningProxy;

  beforeAll(async () => {
    ds = await startDownstream();
    proxy = await startProxy({
      'config.yaml': testConfig({ selector: 'round-robin.js', downstreams: [{ name: 'only', addr: ds.addr }], ...TEST_LIMITS, login_penalty: PENALTY }),
    });
  });
  afterAll(async () => {
    await proxy?.stop();
    await ds?.close();
  });

  test('20 wrong passwords from one address are slowed, then refused with 4xx; another address is unaffected; the penalty expires', async () => {
    const results = [];
    let lastFailure = Date.now();
    for (let i = 0; i < 20; i++) {
      const result = await attempt(proxy.port, '127.0.0.1', `wrong-${i}`);
      if (result.at === 'auth') lastFailure = Date.now();
      results.push(result);
    }

    const answered = results.filter((r) => r.at === 'auth' && r.reply.code === 535);
    const refused = results.filter((r) => r.reply.code >= 400 && r.reply.code < 500);
    expect(answered).toHaveLength(PENALTY.lockout_failures);
    expect(refused.length).toBe(20 - PENALTY.lockout_failures);
    for (const r of refused) expect(r.reply.text).toMatch(/^421 4\.7\.0 Too many failed logins from your address/);
    // Slowed: the n-th failure (from 0) past the free ones waits failure_delay × 2^(n − free).
    answered.forEach((r, n) => {
      const wait = n < PENALTY.free_failures ? PENALTY.failure_delay_ms : Math.min(PENALTY.max_delay_ms, PENALTY.failure_delay_ms * 2 ** (n - PENALTY.free_failures));
      expect(r.ms).toBeGreaterThanOrEqual(wait - 15);
    });
    expect(answered[4].ms).toBeGreaterThan(answered[0].ms);

    // Another client address logs in and sends at once.
    const other = await swaks(proxy.port, ['--local-interface', '127.0.0.2', '--header', 'Subject: from another address']);
    expect(other.stdout).toMatch(/235 /);
    expect(other.code).toBe(0);

    // Even the right password is refused from the locked-out address...
    expect((await attempt(proxy.port, '127.0.0.1', 'password123')).reply.code).toBe(421);
    // ...until the window has passed since its last failure (refused connections do not extend it).
    await new Promise((r) => setTimeout(r, Math.max(0, PENALTY.window_ms + 100 - (Date.now() - lastFailure))));
    const after = await attempt(proxy.port, '127.0.0.1', 'password123');
    expect(after.reply.code).toBe(235);
  });

  test('one connection gets 3 AUTH attempts: the third failure is answered 421 and the connection closed', async () => {
    const smtp = await connectRaw(proxy.port, 15_000, { localAddress: '127.0.0.3' });
    try {
      await smtp.command('EHLO client.example');
      expect((await smtp.command(`AUTH PLAIN ${plainAuth('test@user.com', 'wrong-1')}`)).code).toBe(535);
      expect((await smtp.command(`AUTH PLAIN ${plainAuth('test@user.com', 'wrong-2')}`)).code).toBe(535);
      const third = await smtp.command(`AUTH PLAIN ${plainAuth('test@user.com', 'wrong-3')}`);
      expect(third.text).toMatch(/^421 4\.7\.0 Too many failed logins on this connection/);
      await expect(smtp.command('NOOP')).rejects.toThrow(/closed/);
    } finally {
      smtp.close();
    }
  });

  test('while an address is penalised, the right password is answered after the same wait as a wrong one; success clears the penalty', async () => {
    const from = '127.0.0.4';
    for (let i = 0; i < 3; i++) expect((await attempt(proxy.port, from, `wrong-${i}`)).reply.code).toBe(535);
    // 3 failures, 2 free: the next attempt waits failure_delay × 2.
    const good = await attempt(proxy.port, from, 'password123');
    expect(good.reply.code).toBe(235);
    expect(good.ms).toBeGreaterThanOrEqual(PENALTY.failure_delay_ms * 2 - 15);
    // Cleared: the next failure is a free one again (answered after the base delay only, not the doubled one).
    const next = await attempt(proxy.port, from, 'wrong-again');
    expect(next.reply.code).toBe(535);
  });

  test('a connection opened before its address was locked out gets 454 4.7.0 on AUTH, the password unchecked', async () => {
    const from = '127.0.0.6';
    const early = await connectRaw(proxy.port, 15_000, { localAddress: from });
    try {
      await early.command('EHLO client.example');
      for (let i = 0; i < PENALTY.lockout_failures; i++) await attempt(proxy.port, from, `wrong-${i}`);
      const reply = await early.command(`AUTH PLAIN ${plainAuth('test@user.com', 'password123')}`);
      expect(reply.text).toMatch(/^454 4\.7\.0 Too many failed logins from your address/);
    } finally {
      early.close();
    }
  });

  test('refused AUTHs of a locked-out address count toward the three a connection gets', async () => {
    const from = '127.0.0.8';
    const early = await connectRaw(proxy.port, 15_000, { localAddress: from });
    try {
      await early.command('EHLO client.example');
      for (let i = 0; i < PENALTY.lockout_failures; i++) await attempt(proxy.port, from, `wrong-${i}`);
      const auth = `AUTH PLAIN ${plainAuth('test@user.com', 'wrong')}`;
      expect((await early.command(auth)).code).toBe(454);
      expect((await early.command(auth)).code).toBe(454);
      expect((await early.command(auth)).text).toMatch(/^421 4\.7\.0 Too many failed logins on this connection/);
      await expect(early.command('NOOP')).rejects.toThrow();
    } finally {
      early.close();
    }
  });

  test('failed logins are reported on the App’s events for metrics', async () => {
    const seen: { reason: string }[] = [];
    const listener = (event: { reason: string }): void => void seen.push(event);
    proxy.app.events.on('auth_failure', listener);
    try {
      await attempt(proxy.port, '127.0.0.5', 'wrong');
    } finally {
      proxy.app.events.off('auth_failure', listener);
    }
    expect(seen).toEqual([expect.objectContaining({ reason: 'SMTPMUX_AUTH_FAILED', remote: '127.0.0.5' })]);
  });
});

describe('a burst of correct logins', () => {
  let ds: Downstream;
  let proxy: RunningProxy;

  beforeAll(async () => {
    ds = await startDownstream();
    // argon2id takes milliseconds to verify, so the logins of a burst overlap.
    const password = await hashPassword('password123');
    proxy = await startProxy({ 'config.yaml': testConfig({ selector: 'round-robin.js', password, downstreams: [{ name: 'only', addr: ds.addr }], ...TEST_LIMITS }) });
  });
  afterAll(async () => {
    await proxy?.stop();
    await ds?.close();
  });

  test('15 connections from one address logging in at once all get 235: they are not counted as failures', async () => {
    const replies = await Promise.all(
      Array.from({ length: 15 }, async () => {
        const smtp = await connectRaw(proxy.port);
        try {
          await smtp.command('EHLO client.example');
          return (await smtp.command(`AUTH PLAIN ${plainAuth('test@user.com', 'password123')}`)).text;
        } finally {
          smtp.close();
        }
      }),
    );
    expect(replies.filter((r) => !r.startsWith('235 '))).toEqual([]);
  });
});
