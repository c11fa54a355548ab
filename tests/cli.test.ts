// `smtpmux serve` as users run it: a separate process started without --no-node-snapshot, serving real
// SMTP, shutting down cleanly on SIGTERM with a message in flight, and never printing a password.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { startDownstream, subjectOf, type Downstream } from './support/downstream';
import { testConfig, TEST_LIMITS } from './support/config';
import { sendWithNodemailer, swaks } from './support/clients';
import { envWithout, startServe, type ServeProcess } from './support/cli';

let dir: string;
const running: ServeProcess[] = [];
const downstreams: Downstream[] = [];

beforeAll(() => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'smtpmux-cli-'));
});
afterEach(async () => {
  for (const p of running.splice(0)) await p.kill();
  for (const ds of downstreams.splice(0)) await ds.close();
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function writeConfig(name: string, text: string): string {
  const file = path.join(dir, name);
  writeFileSync(file, text);
  return file;
}

/** The environment a user's shell would give: no NODE_OPTIONS, so no --no-node-snapshot. */
const userEnv = (extra: Record<string, string> = {}): NodeJS.ProcessEnv => ({ ...envWithout('NODE_OPTIONS', 'SMTPMUX_CONFIG', 'SMTPMUX_PORT'), ...extra });

async function serve(file: string, extra: Record<string, string> = {}): Promise<ServeProcess> {
  const p = await startServe(file, userEnv(extra));
  running.push(p);
  return p;
}

async function downstream(options: Parameters<typeof startDownstream>[0] = {}): Promise<Downstream> {
  const ds = await startDownstream(options);
  downstreams.push(ds);
  return ds;
}

describe('smtpmux serve', () => {
  test('started without --no-node-snapshot, it re-execs itself with the flag and serves', async () => {
    const ds = await downstream();
    const file = writeConfig('reexec.yaml', testConfig({ selector: 'round-robin.js', ...TEST_LIMITS, downstreams: [{ name: 'only', addr: ds.addr }] }));
    const env = userEnv();
    expect(env.NODE_OPTIONS).toBeUndefined();
    const p = await serve(file);
    // The same process (execve keeps the pid), now running with the flag isolated-vm needs.
    const cmdline = readFileSync(`/proc/${p.child.pid}/cmdline`, 'utf8').split('\0');
    expect(cmdline).toContain('--no-node-snapshot');
    expect(await sendWithNodemailer(p.port, { subject: 'through the re-exec' })).toMatchObject({ ok: true, code: 250 });
    expect(ds.received.map((r) => subjectOf(r.raw))).toEqual(['through the re-exec']);
    p.child.kill('SIGTERM');
    expect(await p.exited).toBe(0);
  });

  test('SIGTERM with a message in flight: the client still gets 250, new connections are refused, the process exits 0 and logs "stopped"', async () => {
    let inFlight!: () => void;
    const reachedDownstream = new Promise<void>((resolve) => (inFlight = resolve));
    // The downstream has the whole message, then takes a second to answer.
    const ds = await downstream({
      fail: { kind: 'stall', ms: 1000 },
      decide: () => {
        inFlight();
        return undefined;
      },
    });
    const file = writeConfig('sigterm.yaml', testConfig({ selector: 'round-robin.js', ...TEST_LIMITS, downstreams: [{ name: 'slow', addr: ds.addr }] }));
    const p = await serve(file);
    const sending = sendWithNodemailer(p.port, { subject: 'in flight at SIGTERM' });
    await reachedDownstream;
    const signalled = Date.now();
    p.child.kill('SIGTERM');
    await p.waitFor(/shutting down/);
    const refused = await new Promise<string>((resolve) => {
      const socket = net.connect({ host: '127.0.0.1', port: p.port });
      socket.once('connect', () => {
        socket.destroy();
        resolve('connected');
      });
      socket.once('error', (err: NodeJS.ErrnoException) => resolve(String(err.code)));
    });
    expect(refused).toBe('ECONNREFUSED');
    const sent = await sending;
    expect(sent).toMatchObject({ ok: true, code: 250 });
    expect(ds.received).toHaveLength(1);
    expect(await p.exited).toBe(0);
    expect(Date.now() - signalled).toBeLessThan(10_000);
    const lines = p
      .stdout()
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines.map((l) => l.msg)).toEqual(expect.arrayContaining(['signal received', 'message delivered', 'stopped']));
    // The message finished before the process said it stopped.
    const order = lines.map((l) => l.msg);
    expect(order.indexOf('message delivered')).toBeLessThan(order.indexOf('stopped'));
    expect(p.stderr()).toBe('');
  });

  test('no password appears in stdout or stderr of a run with a failed login and a downstream auth failure', async () => {
    const USER_PASSWORD = 'UserPw-0a9f3c71';
    const WRONG_PASSWORD = 'WrongPw-5d3e8812';
    const DOWNSTREAM_PASS = 'DsPass-77e1b2c4';
    const GOOD_DOWNSTREAM_PASS = 'DsGood-39fa0d55';
    const refusing = await downstream({ user: 'relay', pass: 'what-the-downstream-expects' });
    const accepting = await downstream({ user: 'relay2', pass: GOOD_DOWNSTREAM_PASS });
    const file = writeConfig(
      'secrets.yaml',
      testConfig({
        selector: 'waterfall.js',
        ...TEST_LIMITS,
        email: 'app@user.com',
        password: USER_PASSWORD,
        downstreams: [
          { name: 'refusing', addr: refusing.addr, user: 'relay', pass: DOWNSTREAM_PASS },
          { name: 'accepting', addr: accepting.addr, user: 'relay2', pass: GOOD_DOWNSTREAM_PASS },
        ],
      }),
    );
    const p = await serve(file, { SMTPMUX_LOG_LEVEL: 'debug' });

    const badLogin = await sendWithNodemailer(p.port, { subject: 'bad login' }, { user: 'app@user.com', pass: WRONG_PASSWORD });
    expect(badLogin).toMatchObject({ ok: false, code: 535 });
    const badLoginLogin = await swaks(p.port, ['-a', 'LOGIN', '--auth-user', 'app@user.com', '--auth-password', WRONG_PASSWORD]);
    expect(badLoginLogin.stdout).toMatch(/535 5\.7\.8/);
    // The first downstream refuses our login (EAUTH), the waterfall falls through to the second.
    const sent = await sendWithNodemailer(p.port, { subject: 'after a downstream auth failure' }, { user: 'app@user.com', pass: USER_PASSWORD });
    expect(sent).toMatchObject({ ok: true, code: 250 });
    expect(refusing.authFailures()).toBeGreaterThan(0);
    expect(accepting.received.map((r) => r.user)).toEqual(['relay2']);

    p.child.kill('SIGTERM');
    expect(await p.exited).toBe(0);
    const output = p.stdout() + p.stderr();
    expect(output).toMatch(/authentication failed/);
    expect(output).toMatch(/EAUTH/);
    const b64 = (text: string): string => Buffer.from(text, 'utf8').toString('base64');
    for (const secret of [USER_PASSWORD, WRONG_PASSWORD, DOWNSTREAM_PASS, GOOD_DOWNSTREAM_PASS]) {
      expect({ secret, found: output.includes(secret) }).toEqual({ secret, found: false });
      expect({ secret, base64: output.includes(b64(secret)) }).toEqual({ secret, base64: false });
    }
    expect(output).not.toContain(b64(`\0app@user.com\0${USER_PASSWORD}`));
  });
});
