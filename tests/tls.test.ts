// Inbound TLS with real clients: swaks over STARTTLS and over implicit TLS, AUTH refused before
// STARTTLS, and a certificate replaced on disk served to new connections without a restart (seen by
// openssl s_client).
import { X509Certificate } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ConfigError, insecureListenerWarning, parseConfig } from '../src/config/load';
import { randomSerial, selfSigned } from '../src/tls/selfsigned';
import { startDownstream, type Downstream } from './support/downstream';
import { testConfig, TEST_LIMITS } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { run, swaks } from './support/clients';
import { connectRaw, plainAuth } from './support/raw';
import { runCli } from './support/cli';

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

describe('TLS set-up helpers', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'smtpmux-tls-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  test('a self-signed certificate\'s serial number is always positive minimal DER (never a padding byte that fails to parse)', () => {
    for (let i = 0; i < 2000; i++) {
      const serial = randomSerial();
      expect(serial).toHaveLength(16);
      expect(serial[0] >= 0x40 && serial[0] <= 0x7f).toBe(true);
    }
  });

  test('smtpmux tls selfsigned DIR writes a certificate openssl reads and a private key only its owner reads; it does not overwrite', async () => {
    const made = await runCli(['tls', 'selfsigned', dir, '--name', 'mx.example.test', '--name', '127.0.0.1', '--days', '10']);
    expect(made.stdout).toMatch(/tls:\n  cert: .*fullchain\.pem\n  key: .*privkey\.pem/);
    expect(made.code).toBe(0);
    expect(statSync(path.join(dir, 'privkey.pem')).mode & 0o777).toBe(0o600);
    const text = await run('openssl', ['x509', '-in', path.join(dir, 'fullchain.pem'), '-noout', '-text']);
    expect(text.code).toBe(0);
    expect(text.stdout).toMatch(/DNS:mx\.example\.test, IP Address:127\.0\.0\.1/);
    const pair = await run('openssl', ['pkey', '-in', path.join(dir, 'privkey.pem'), '-pubout']);
    expect(pair.stdout).toBe((await run('openssl', ['x509', '-in', path.join(dir, 'fullchain.pem'), '-noout', '-pubkey'])).stdout);
    const before = readFileSync(path.join(dir, 'privkey.pem'), 'utf8');
    const again = await runCli(['tls', 'selfsigned', dir]);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/exists; use --force/);
    expect(readFileSync(path.join(dir, 'privkey.pem'), 'utf8')).toBe(before);
  });

  test('a tls block with a missing key, an unreadable file or a mismatched pair is a config error naming file and key, never the key', async () => {
    const file = path.join(dir, 'tls-errors.yaml');
    const problems = async (tls: Record<string, unknown>): Promise<string> => {
      const err = await parseConfig(testConfig({ selector: 'round-robin.js', downstreams: [{ addr: '127.0.0.1:25' }], tls }), file, {}).catch((e: ConfigError) => e);
      expect(err).toBeInstanceOf(ConfigError);
      return (err as ConfigError).problems.join('\n');
    };
    expect(await problems({ cert: 'fullchain.pem' })).toMatch(/tls\.key: give cert and key/);
    expect(await problems({ cert: 'nowhere.pem', key: 'privkey.pem' })).toMatch(/tls\.cert: cannot read .*nowhere\.pem \(ENOENT\)/);
    const other = selfSigned(['localhost'], 1);
    writeFileSync(path.join(dir, 'other-key.pem'), other.key);
    const mismatch = await problems({ cert: 'fullchain.pem', key: 'other-key.pem' });
    expect(mismatch).toMatch(/tls: .*fullchain\.pem and .*other-key\.pem are not a usable certificate and key/);
    expect(mismatch).not.toContain(other.key.split('\n')[1]);
  });

  test('a listener beyond loopback with allow_insecure_auth and no tls is called INSECURE (smtpmux check says so too); with tls it is not', async () => {
    const spec = { selector: 'round-robin.js', downstreams: [{ addr: '127.0.0.1:25' }], listen: { host: '0.0.0.0', port: 2525 } };
    const file = path.join(dir, 'open.yaml');
    writeFileSync(file, testConfig(spec));
    const open = await parseConfig(testConfig(spec), file, {});
    expect(insecureListenerWarning(open)).toMatch(/^INSECURE: listening on 0\.0\.0\.0:2525 with allow_insecure_auth and no tls/);
    const check = await runCli(['check', '--config', file]);
    expect(check.stdout).toMatch(/warning: INSECURE/);
    const withTls = await parseConfig(testConfig({ ...spec, tls: { selfsigned: true } }), file, {});
    expect(insecureListenerWarning(withTls)).toBeUndefined();
    const loopback = await parseConfig(testConfig({ ...spec, listen: { host: '127.0.0.1', port: 2525 } }), file, {});
    expect(insecureListenerWarning(loopback)).toBeUndefined();
  });
});
