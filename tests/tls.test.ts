// Inbound TLS with real clients: swaks over STARTTLS and over implicit TLS, AUTH refused before
// STARTTLS, and a certificate replaced on disk served to new connections without a restart (seen by
// openssl s_client).
import { X509Certificate } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { selfSigned } from '../src/tls/selfsigned';
import { startDownstream, type Downstream } from './support/downstream';
import { testConfig, TEST_LIMITS } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { run, swaks } from './support/clients';
import { connectRaw, plainAuth } from './support/raw';

/** The certificate a new connection is shown, as openssl s_client sees it. */
async function servedCertificate(port: number, mode: 'starttls' | 'implicit'): Promise<X509Certificate> {
  const args = ['s_client', '-connect', `127.0.0.1:${port}`, '-servername', 'localhost', ...(mode === 'starttls' ? ['-starttls', 'smtp'] : [])];
  const result = await run('openssl', args, 15_000, 'QUIT\r\n');
  const pem = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/.exec(result.stdout)?.[0];
  if (!pem) throw new Error(`openssl s_client showed no certificate:\n${result.stdout}\n${result.stderr}`);
  return new X509Certificate(pem);
}

async function waitFor(what: string, probe: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!probe()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('inbound TLS', () => {
  let ds: Downstream;
  let proxy: RunningProxy;
  let first: ReturnType<typeof selfSigned>;

  beforeAll(async () => {
    ds = await startDownstream();
    first = selfSigned(['localhost', '127.0.0.1'], 30);
    const config = testConfig({
      selector: 'round-robin.js',
      downstreams: [{ name: 'only', addr: ds.addr }],
      ...TEST_LIMITS,
      allow_insecure_auth: false,
      tls: { cert: 'tls/fullchain.pem', key: 'tls/privkey.pem', implicit: { host: '127.0.0.1', port: 0 } },
    });
    proxy = await startProxy({ 'config.yaml': config, 'tls/fullchain.pem': first.cert, 'tls/privkey.pem': first.key }, { watch: { debounceMs: 50, pollMs: 300 } });
  });
  afterAll(async () => {
    await proxy?.stop();
    await ds?.close();
  });
  beforeEach(() => ds.received.splice(0));

  test('swaks --tls logs in after STARTTLS and the message is delivered', async () => {
    const result = await swaks(proxy.port, ['--tls', '--header', 'Subject: over starttls']);
    expect(result.stdout).toMatch(/STARTTLS/);
    expect(result.stdout).toMatch(/TLS started/);
    expect(result.stdout).toMatch(/235 /);
    expect(result.code).toBe(0);
    expect(ds.received).toHaveLength(1);
  });

  test('swaks --tlsc logs in over implicit TLS and the message is delivered', async () => {
    expect(proxy.app.implicitPort).toEqual(expect.any(Number));
    const result = await swaks(proxy.app.implicitPort!, ['--tlsc', '--header', 'Subject: over implicit tls']);
    expect(result.stdout).toMatch(/TLS started/);
    expect(result.stdout).toMatch(/235 /);
    expect(result.code).toBe(0);
    expect(ds.received).toHaveLength(1);
  });

  test('AUTH before STARTTLS gets 538 5.7.11, and EHLO offers STARTTLS', async () => {
    const smtp = await connectRaw(proxy.port);
    try {
      const ehlo = await smtp.command('EHLO client.example');
      expect(ehlo.text).toMatch(/STARTTLS/);
      const reply = await smtp.command(`AUTH PLAIN ${plainAuth('test@user.com', 'password123')}`);
      expect(reply.text).toMatch(/^538 5\.7\.11 /);
    } finally {
      smtp.close();
    }
    const login = await swaks(proxy.port, ['-a', 'PLAIN']);
    expect(login.stdout).toMatch(/538 5\.7\.11 /);
    expect(ds.received).toHaveLength(0);
  });

  test('TLS older than 1.2 is refused', async () => {
    const result = await run('openssl', ['s_client', '-connect', `127.0.0.1:${proxy.app.implicitPort}`, '-tls1_1', '-cipher', 'DEFAULT@SECLEVEL=0'], 15_000, '');
    // The handshake fails: no cipher agreed, no certificate shown.
    expect(result.stdout).toMatch(/Cipher is \(NONE\)/);
    expect(result.stdout).not.toMatch(/BEGIN CERTIFICATE/);
  });

  test('replacing the certificate files changes the certificate new connections see, without a restart', async () => {
    const fingerprint = (pem: string): string => new X509Certificate(pem).fingerprint256;
    expect((await servedCertificate(proxy.port, 'starttls')).fingerprint256).toBe(fingerprint(first.cert));
    const reloadsBefore = proxy.logs.filter((l) => l.msg === 'reloaded').length;

    const second = selfSigned(['localhost', '127.0.0.1'], 60);
    // As certbot does: both files replaced; in between the pair does not match and that reload fails.
    writeFileSync(path.join(proxy.dir, 'tls/privkey.pem'), second.key);
    writeFileSync(path.join(proxy.dir, 'tls/fullchain.pem'), second.cert);
    await waitFor('a reload with the new certificate', () => proxy.logs.filter((l) => l.msg === 'reloaded').length > reloadsBefore);
    await waitFor('the reloads to settle', () => {
      const last = [...proxy.logs].reverse().find((l) => l.msg === 'reloaded' || String(l.msg).startsWith('reload failed'));
      return last?.msg === 'reloaded';
    });

    expect((await servedCertificate(proxy.port, 'starttls')).fingerprint256).toBe(fingerprint(second.cert));
    expect((await servedCertificate(proxy.app.implicitPort!, 'implicit')).fingerprint256).toBe(fingerprint(second.cert));
    const result = await swaks(proxy.port, ['--tls', '--header', 'Subject: after the new certificate']);
    expect(result.code).toBe(0);
    // A failed attempt in between names the files, never the key.
    expect(proxy.logText()).not.toContain(second.key.split('\n')[1]);
  });
});
