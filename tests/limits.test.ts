// Connection and transaction limits with real sockets: recipients per message (452 past 100), an idle
// connection flood capped overall and per client address (421), connections that never log in closed,
// and a password rotation that ends the sessions logged in with the old password.
import { connect, isIPv6 } from 'node:net';
import { startDownstream, type Downstream } from './support/downstream';
import { testConfig, TEST_LIMITS } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { swaks } from './support/clients';
import { connectRaw, plainAuth, type RawSmtp } from './support/raw';

/** A connection as a load balancer makes it: a PROXY v1 header naming the client (IPv4 or IPv6), then SMTP. */
async function connectViaBalancer(port: number, client: string, balancer = '127.0.0.1'): Promise<RawSmtp> {
  const socket = connect({ host: '127.0.0.1', port, localAddress: balancer });
  await new Promise((r) => socket.once('connect', r));
  const [family, local] = isIPv6(client) ? ['TCP6', '::1'] : ['TCP4', '127.0.0.1'];
  socket.write(`PROXY ${family} ${client} ${local} 40000 25\r\n`);
  return connectRaw(0, 15_000, { socket });
}

describe('recipients per message', () => {
  let ds: Downstream;
  let proxy: RunningProxy;

  beforeAll(async () => {
    ds = await startDownstream();
    // max_recipients is left at its default, 100.
    proxy = await startProxy({ 'config.yaml': testConfig({ selector: 'round-robin.js', downstreams: [{ name: 'only', addr: ds.addr }], ...TEST_LIMITS }) });
  });
  afterAll(async () => {
    await proxy?.stop();
    await ds?.close();
  });

  test('the 101st recipient gets 452 4.5.3, a repeated one does not count, and the message goes to the first 100', async () => {
    const smtp = await connectRaw(proxy.port);
    try {
      await smtp.command('EHLO client.example');
      expect((await smtp.command(`AUTH PLAIN ${plainAuth('test@user.com', 'password123')}`)).code).toBe(235);
      expect((await smtp.command('MAIL FROM:<app@example.com>')).code).toBe(250);
      for (let i = 1; i <= 100; i++) expect((await smtp.command(`RCPT TO:<rcpt${i}@example.org>`)).code).toBe(250);
      const extra = await smtp.command('RCPT TO:<rcpt101@example.org>');
      expect(extra.text).toMatch(/^452 4\.5\.3 Too many recipients/);
      expect((await smtp.command('RCPT TO:<RCPT7@example.org>')).code).toBe(250);
      expect((await smtp.command('DATA')).code).toBe(354);
      expect((await smtp.sendData('Subject: many\r\n\r\nhello\r\n.\r\n')).code).toBe(250);
    } finally {
      smtp.close();
    }
    expect(ds.received).toHaveLength(1);
    expect(ds.received[0].to).toHaveLength(100);
  });
});

describe('connection limits', () => {
  let ds: Downstream;
  let proxy: RunningProxy;
  const open: RawSmtp[] = [];

  beforeAll(async () => {
    ds = await startDownstream();
    proxy = await startProxy({
      'config.yaml': testConfig({
        selector: 'round-robin.js',
        downstreams: [{ name: 'only', addr: ds.addr }],
        ...TEST_LIMITS,
        max_connections: 6,
        max_connections_per_address: 4,
        auth_timeout_ms: 1500,
      }),
    });
  });
  afterAll(async () => {
    for (const smtp of open) smtp.close();
    await proxy?.stop();
    await ds?.close();
  });

  test('an idle-connection flood is capped per address and overall with 421 4.7.0; idle ones are closed after auth_timeout_ms', async () => {
    const connect = async (from: string): Promise<number> => {
      const smtp = await connectRaw(proxy.port, 15_000, { localAddress: from });
      open.push(smtp);
      return smtp.greeting.code;
    };
    const fromFirst = [];
    for (let i = 0; i < 6; i++) fromFirst.push(await connect('127.0.0.1'));
    expect(fromFirst).toEqual([220, 220, 220, 220, 421, 421]);
    expect(open[4].greeting.text).toMatch(/^421 4\.7\.0 Too many connections from your address/);
    expect([await connect('127.0.0.2'), await connect('127.0.0.2')]).toEqual([220, 220]);
    // Six open: a third address is turned away too.
    expect(await connect('127.0.0.3')).toBe(421);
    expect(open[8].greeting.text).toMatch(/^421 4\.7\.0 Too many connections; /);

    // None of the six logs in: each is closed with 421 once auth_timeout_ms has passed.
    const idle = open.filter((s) => s.greeting.code === 220);
    const deadline = Date.now() + 15_000;
    while (proxy.app.connections > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    for (const smtp of idle) {
      const reply = await smtp.command('NOOP').catch((e: Error) => e);
      expect(reply instanceof Error ? reply.message : reply.text).toMatch(/^421 4\.7\.0 No login in time|closed/);
    }
    expect(proxy.logs.filter((l) => l.msg === 'closed a connection that did not log in within auth_timeout_ms')).toHaveLength(idle.length);
    expect(proxy.app.connections).toBe(0);
    const result = await swaks(proxy.port, ['--header', 'Subject: after the flood']);
    expect(result.code).toBe(0);
  });
});

describe('sessions end with their password', () => {
  let ds: Downstream;
  let proxy: RunningProxy;
  const config = (password: string): string =>
    testConfig({
      ...TEST_LIMITS,
      users: [
        { email: 'test@user.com', password, selector: 'round-robin.js', downstreams: [{ name: 'only', addr: ds.addr }] },
        { email: 'other@user.com', password: 'other-pass', selector: 'round-robin.js', downstreams: [{ name: 'only', addr: ds.addr }] },
      ],
    });

  beforeAll(async () => {
    ds = await startDownstream();
    proxy = await startProxy({ 'config.yaml': config('password123') });
  });
  afterAll(async () => {
    await proxy?.stop();
    await ds?.close();
  });

  test('a password rotation closes the open idle session, refuses the message of one mid-transaction, and leaves other users alone', async () => {
    const login = async (user: string, pass: string): Promise<RawSmtp> => {
      const smtp = await connectRaw(proxy.port);
      await smtp.command('EHLO client.example');
      expect((await smtp.command(`AUTH PLAIN ${plainAuth(user, pass)}`)).code).toBe(235);
      return smtp;
    };
    const idle = await login('test@user.com', 'password123');
    const midway = await login('test@user.com', 'password123');
    const other = await login('other@user.com', 'other-pass');
    try {
      expect((await midway.command('MAIL FROM:<app@example.com>')).code).toBe(250);
      expect((await midway.command('RCPT TO:<rcpt@example.org>')).code).toBe(250);

      proxy.write('config.yaml', config('rotated-password-456'));
      expect((await proxy.app.reload('test')).ok).toBe(true);

      // The idle session was told and closed.
      const told = await idle.command('NOOP').catch((e: Error) => e);
      expect(told instanceof Error ? told.message : told.text).toMatch(/^421 4\.7\.0 Your login was changed|closed/);
      // The one inside a transaction does not get its message through with the old password.
      expect((await midway.command('DATA')).code).toBe(354);
      const data = await midway.sendData('Subject: after rotation\r\n\r\nold password\r\n.\r\n');
      expect(data.text).toMatch(/^421 4\.7\.0 Your login was changed/);
      // Another user's session carries on.
      expect((await other.sendMessage({ body: 'Subject: other user\r\n\r\nstill here\r\n' })).code).toBe(250);
    } finally {
      for (const s of [idle, midway, other]) s.close();
    }
    expect(ds.received.map((m) => m.raw.toString())).toEqual([expect.stringContaining('still here')]);
    expect(proxy.logs.some((l) => l.msg === 'closed sessions whose login was changed or removed')).toBe(true);
    // The new password works, the old one does not.
    expect((await swaks(proxy.port, ['--auth-password', 'rotated-password-456'])).code).toBe(0);
    expect((await swaks(proxy.port)).stdout).toMatch(/535 /);
  });
});

/**
 * A proxy with one downstream and these config keys (failed logins answered after 10 ms), started
 * before the tests of the describe that calls this and stopped after them.
 */
function proxyBehindBalancer(extra: Record<string, unknown>): { get(): RunningProxy } {
  let ds: Downstream | undefined;
  let proxy: RunningProxy | undefined;
  beforeAll(async () => {
    ds = await startDownstream();
    proxy = await startProxy({
      'config.yaml': testConfig({
        selector: 'round-robin.js',
        downstreams: [{ name: 'only', addr: ds.addr }],
        ...TEST_LIMITS,
        login_penalty: { failure_delay_ms: 10 },
        ...extra,
      }),
    });
  });
  afterAll(async () => {
    await proxy?.stop();
    await ds?.close();
  });
  return { get: () => proxy as RunningProxy };
}

describe('proxy_protocol', () => {
  const proxy = proxyBehindBalancer({ proxy_protocol: true, max_connections_per_address: 1 });

  const viaBalancer = (client: string): Promise<RawSmtp> => connectViaBalancer(proxy.get().port, client);

  test('the address in the PROXY header is the client for limits and logs', async () => {
    const first = await viaBalancer('203.0.113.7');
    const second = await viaBalancer('203.0.113.7');
    const other = await viaBalancer('198.51.100.9');
    try {
      expect(first.greeting.code).toBe(220);
      // One connection per address here: the same client again is refused, another client is not.
      expect(second.greeting.text).toMatch(/^421 4\.7\.0 Too many connections from your address/);
      expect(other.greeting.code).toBe(220);
      await first.command('EHLO client.example');
      expect((await first.command(`AUTH PLAIN ${plainAuth('test@user.com', 'wrong')}`)).code).toBe(535);
    } finally {
      for (const s of [first, second, other]) s.close();
    }
    expect(proxy.get().logs.some((l) => l.msg === 'authentication failed' && l.remote === '203.0.113.7')).toBe(true);
  });
});

describe('IPv6 clients count per /64', () => {
  const proxy = proxyBehindBalancer({ proxy_protocol: true, max_connections_per_address: 2, login_penalty: { failure_delay_ms: 10, free_failures: 1, lockout_failures: 3 } });

  const viaBalancer6 = (client: string): Promise<RawSmtp> => connectViaBalancer(proxy.get().port, client);

  test('addresses of one /64 share the per-address connection limit; another /64 does not', async () => {
    const opened = [
      await viaBalancer6('2001:db8:1:2::7'),
      await viaBalancer6('2001:db8:1:2:ffff::8'),
      await viaBalancer6('2001:db8:1:2::9'),
      await viaBalancer6('2001:db8:1:3::7'),
    ];
    try {
      expect(opened.map((c) => c.greeting.code)).toEqual([220, 220, 421, 220]);
      expect(opened[2].greeting.text).toMatch(/^421 4\.7\.0 Too many connections from your address/);
    } finally {
      for (const c of opened) c.close();
    }
  });

  test('failed logins from addresses of one /64 add up to one lockout; another /64 is unaffected', async () => {
    const first = await viaBalancer6('2001:db8:9:9::a');
    const second = await viaBalancer6('2001:db8:9:9::b');
    const elsewhere = await viaBalancer6('2001:db8:9:a::a');
    const wrong = `AUTH PLAIN ${plainAuth('test@user.com', 'wrong')}`;
    try {
      for (const c of [first, second, elsewhere]) await c.command('EHLO client.example');
      for (const c of [first, first, second]) expect((await c.command(wrong)).code).toBe(535);
      // The fourth attempt of the /64 (the second connection's second): locked out.
      expect((await second.command(wrong)).text).toMatch(/^454 4\.7\.0/);
      expect((await elsewhere.command(wrong)).code).toBe(535);
    } finally {
      for (const c of [first, second, elsewhere]) c.close();
    }
  });
});

describe('proxy_protocol as a list of balancers', () => {
  const proxy = proxyBehindBalancer({ proxy_protocol: ['127.0.0.2'] });

  test('a PROXY header is read from a listed balancer only; anyone else is a client and cannot claim an address', async () => {
    const balanced = await connectViaBalancer(proxy.get().port, '198.51.100.20', '127.0.0.2');
    const direct = await connectRaw(proxy.get().port);
    const wrong = `AUTH PLAIN ${plainAuth('test@user.com', 'wrong')}`;
    try {
      expect(balanced.greeting.code).toBe(220);
      expect(direct.greeting.code).toBe(220);
      // From an unlisted peer the header is just an unknown command, and the address stays its own.
      expect((await direct.command('PROXY TCP4 203.0.113.50 127.0.0.1 40000 25')).code).toBeGreaterThanOrEqual(500);
      for (const c of [balanced, direct]) {
        await c.command('EHLO client.example');
        expect((await c.command(wrong)).code).toBe(535);
      }
    } finally {
      balanced.close();
      direct.close();
    }
    const remotes = proxy.get().logs.filter((l) => l.msg === 'authentication failed').map((l) => l.remote);
    expect(remotes.sort()).toEqual(['127.0.0.1', '198.51.100.20']);
  });
});
