// The admin HTTP listener as an orchestrator and a person use it: /readyz flips to 503 during the
// shutdown drain and after a failed reload, and back after a good one; /livez stays 200; the status
// page lists every configured downstream and no credential, body or recipient; with http.token,
// everything but the probes needs it; `smtpmux health` asks /readyz.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { SMTPServer } from 'smtp-server';
import { parseConfig } from '../src/config/load';
import { listenOnLoopback, startDownstream, type Downstream, type Listening } from './support/downstream';
import YAML from 'yaml';
import { configObject, testConfig, TEST_LIMITS } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { sendWithNodemailer } from './support/clients';
import { get } from './support/admin';
import { envWithout, runCli, startServe } from './support/cli';

/** A downstream that holds each message until the test lets it go. */
async function holdingDownstream(): Promise<Listening & { arrived: Promise<void>; release: () => void }> {
  let arrive!: () => void;
  const arrived = new Promise<void>((resolve) => (arrive = resolve));
  let release!: () => void;
  const released = new Promise<void>((resolve) => (release = resolve));
  const server = new SMTPServer({
    authOptional: true,
    disabledCommands: ['STARTTLS'],
    logger: false,
    onData(stream, _session, callback) {
      stream.resume();
      stream.on('end', () => {
        arrive();
        void released.then(() => callback(null, 'OK'));
      });
    },
  });
  return { ...(await listenOnLoopback(server)), arrived, release };
}

describe('/readyz', () => {
  test('is 503 with a reason while shutdown drains a message in flight, while /livez stays 200', async () => {
    const held = await holdingDownstream();
    const proxy = await startProxy({ 'config.yaml': testConfig({ selector: 'waterfall.js', downstreams: [{ name: 'held', addr: held.addr }], ...TEST_LIMITS }) });
    try {
      const port = proxy.httpPort!;
      expect(await get(port, '/readyz')).toMatchObject({ status: 200, text: 'ready\n' });
      const sending = sendWithNodemailer(proxy.port, { subject: 'in flight' });
      await held.arrived;
      const closing = proxy.app.close();
      const during = await get(port, '/readyz');
      expect(during.status).toBe(503);
      expect(during.text).toMatch(/^not ready: shutting down/);
      expect((await get(port, '/livez')).status).toBe(200);
      held.release();
      expect((await sending).ok).toBe(true);
      await closing;
      // Closed last, after the drain.
      await expect(get(port, '/livez')).rejects.toThrow();
    } finally {
      held.release();
      await proxy.stop();
      await held.close();
    }
  });

  test('is 503 after a failed reload and 200 again after a good one', async () => {
    const ds = await startDownstream();
    const good = testConfig({ selector: 'round-robin.js', downstreams: [{ name: 'a', addr: ds.addr }] });
    const proxy = await startProxy({ 'config.yaml': good });
    try {
      const port = proxy.httpPort!;
      proxy.write('config.yaml', good.replace('round-robin.js', 'no-such-selector.js'));
      expect((await proxy.app.reload()).ok).toBe(false);
      const failed = await get(port, '/readyz');
      expect(failed.status).toBe(503);
      expect(failed.text).toMatch(/^not ready: the config reload at .* failed \(1 problem\(s\)/);
      // The last good config keeps serving meanwhile.
      expect((await sendWithNodemailer(proxy.port, { subject: 'still served' })).ok).toBe(true);
      proxy.write('config.yaml', good);
      expect((await proxy.app.reload()).ok).toBe(true);
      expect(await get(port, '/readyz')).toMatchObject({ status: 200, text: 'ready\n' });
    } finally {
      await proxy.stop();
      await ds.close();
    }
  });
});

describe('the status page and the token', () => {
  const TOKEN = 'admin-token-never-shown-7f3a';
  let a: Downstream;
  let b: Downstream;
  let proxy: RunningProxy;
  let config: string;

  beforeAll(async () => {
    a = await startDownstream({ user: 'relay-login', pass: 'downstream-pass-never-shown' });
    b = await startDownstream({ fail: { kind: 'reply', code: 451, message: '4.3.0 busy' } });
    config = testConfig({
      ...TEST_LIMITS,
      users: [
        {
          selector: 'waterfall.js',
          password: 'user-pass-never-shown',
          downstreams: [
            { name: 'backup-b', addr: b.addr },
            { name: 'primary-a', addr: a.addr, user: 'relay-login', pass: 'downstream-pass-never-shown' },
          ],
        },
        { email: 'other@user.com', password: 'other-pass-never-shown', selector: 'round-robin.js', downstreams: [{ name: 'only-c', addr: '127.0.0.1:9' }] },
      ],
      http: { host: '127.0.0.1', port: 0, token: '${ADMIN_TOKEN}' },
    });
    proxy = await startProxy({ 'config.yaml': config }, { env: { ADMIN_TOKEN: TOKEN } });
    const sent = await sendWithNodemailer(proxy.port, { to: 'secret-rcpt@example.org', subject: 'secret subject', text: 'secret body text' }, { user: 'test@user.com', pass: 'user-pass-never-shown' });
    expect(sent.ok).toBe(true);
  });

  afterAll(async () => {
    await proxy?.stop();
    await Promise.all([a?.close(), b?.close()]);
  });

  const bearer = { authorization: `Bearer ${TOKEN}` };

  test('lists every user and configured downstream with its attempts, and refreshes itself', async () => {
    const page = await get(proxy.httpPort!, '/', bearer);
    expect(page.status).toBe(200);
    expect(page.headers.get('content-type')).toBe('text/html; charset=utf-8');
    for (const shown of ['test@user.com', 'other@user.com', 'backup-b', 'primary-a', 'only-c', a.addr, b.addr, 'waterfall.js', 'round-robin.js']) expect(page.text).toContain(shown);
    expect(page.text).toMatch(/<meta http-equiv="refresh" content="\d+">/);
    // waterfall.js tried backup-b (451) then primary-a (accepted).
    expect(page.text).toMatch(/backup-b[\s\S]*0 ok · 1 failed[\s\S]*primary-a[\s\S]*1 ok · 0 failed/);
    expect(page.text).toContain('1 delivered');
    expect(page.text).toContain('State (cooldowns, rates, quotas): in this process.');
  });

  test('shows no credential, token, recipient, subject or body, and loads nothing from elsewhere', async () => {
    const page = (await get(proxy.httpPort!, '/', bearer)).text;
    for (const secret of ['never-shown', 'relay-login', TOKEN, 'secret-rcpt', 'secret subject', 'secret body']) expect(page).not.toContain(secret);
    expect(page).not.toMatch(/<script|<link|<img|src=|https?:\/\//i);
    const metrics = (await get(proxy.httpPort!, '/metrics', bearer)).text;
    for (const secret of ['never-shown', 'relay-login', TOKEN, 'secret-rcpt']) expect(metrics).not.toContain(secret);
  });

  test('needs the token for / and /metrics, as a bearer or as a browser\'s Basic password, but not for the probes', async () => {
    const port = proxy.httpPort!;
    for (const route of ['/', '/metrics']) {
      expect((await get(port, route)).status).toBe(401);
      expect((await get(port, route, { authorization: 'Bearer wrong-token' })).status).toBe(401);
      expect((await get(port, route, bearer)).status).toBe(200);
    }
    const asked = await get(port, '/');
    expect(asked.headers.get('www-authenticate')).toMatch(/^Basic /);
    const basic = { authorization: `Basic ${Buffer.from(`anyone:${TOKEN}`).toString('base64')}` };
    expect((await get(port, '/', basic)).status).toBe(200);
    expect((await get(port, '/livez')).status).toBe(200);
    expect((await get(port, '/readyz')).status).toBe(200);
    expect((await get(port, '/nothing-here', bearer)).status).toBe(404);
  });

  test('follows a reload that changes the token', async () => {
    const port = proxy.httpPort!;
    proxy.write('config.yaml', config.replace('${ADMIN_TOKEN}', 'rotated-token'));
    expect((await proxy.app.reload()).ok).toBe(true);
    expect((await get(port, '/metrics', bearer)).status).toBe(401);
    expect((await get(port, '/metrics', { authorization: 'Bearer rotated-token' })).status).toBe(200);
  });
});

describe('config', () => {
  const base = `users:
  - email: a@b.c
    password: p
    selector: round-robin.js
    downstreams: [{ addr: "127.0.0.1:25" }]
`;
  const file = path.join(__dirname, 'config.yaml');

  test('defaults to 127.0.0.1:9587 with no token; http: false turns it off; the environment overrides', async () => {
    expect((await parseConfig(base, file, {})).http).toEqual({ host: '127.0.0.1', port: 9587, token: undefined });
    expect((await parseConfig(`${base}http: false\n`, file, { SMTPMUX_HTTP_PORT: '1234' })).http).toBeNull();
    expect((await parseConfig(base, file, { SMTPMUX_HTTP_PORT: '0', SMTPMUX_HTTP_HOST: '0.0.0.0', SMTPMUX_HTTP_TOKEN: 't' })).http).toEqual({ host: '0.0.0.0', port: 0, token: 't' });
    await expect(parseConfig(`${base}http: { port: 99999, colour: red }\n`, file, {})).rejects.toThrow(/http/);
  });
});

describe('start-up', () => {
  test('fails, naming the admin listener, when its port is taken', async () => {
    const first = await startProxy({ 'config.yaml': testConfig({ selector: 'round-robin.js', downstreams: [{ addr: '127.0.0.1:9' }] }) });
    try {
      const taken = String(first.httpPort);
      await expect(startProxy({ 'config.yaml': testConfig({ selector: 'round-robin.js', downstreams: [{ addr: '127.0.0.1:9' }] }) }, { env: { SMTPMUX_HTTP_PORT: taken } })).rejects.toThrow(
        new RegExp(`admin HTTP listener on 127\\.0\\.0\\.1:${taken}: .*EADDRINUSE`),
      );
    } finally {
      await first.stop();
    }
  });
});

describe('smtpmux health', () => {
  test('asks /readyz: 0 while serving, 1 once the proxy is gone', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'smtpmux-health-'));
    const file = path.join(dir, 'config.yaml');
    // No http key: the default port, which SMTPMUX_HTTP_PORT=0 (startServe) moves to a free one.
    const { http: _http, ...config } = configObject({ selector: 'round-robin.js', downstreams: [{ addr: '127.0.0.1:9' }] });
    writeFileSync(file, YAML.stringify(config));
    const env = envWithout('SMTPMUX_CONFIG', 'SMTPMUX_PORT', 'SMTPMUX_HTTP_PORT');
    const serve = await startServe(file, env);
    try {
      expect(serve.httpPort).toBeGreaterThan(0);
      const healthEnv = { ...env, SMTPMUX_HTTP_PORT: String(serve.httpPort) };
      const up = await runCli(['health', '--config', file], { env: healthEnv });
      expect(up).toMatchObject({ code: 0 });
      await serve.kill();
      const down = await runCli(['health', '--config', file], { env: healthEnv });
      expect(down.code).toBe(1);
      expect(down.stderr).toMatch(/smtpmux health: 127\.0\.0\.1:\d+\/readyz/);
    } finally {
      await serve.kill();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
