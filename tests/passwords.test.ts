// Hashed passwords: a bcrypt hash from `htpasswd -nbB` and an argon2id hash from `smtpmux hash-password`
// log in with their cleartext, and the hash strings themselves are not accepted as passwords. Plus what
// the config and the log say about passwords: never a secret.
import { execFile } from 'node:child_process';
import path from 'node:path';
import { storedPassword, classifyPassword } from '../src/auth/password';
import { ConfigError, parseConfig } from '../src/config/load';
import { startDownstream, type Downstream } from './support/downstream';
import { testConfig, TEST_LIMITS } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { run, swaks } from './support/clients';
import { CLI } from './support/cli';
import { connectRaw, plainAuth } from './support/raw';

/** The built CLI with `input` on its stdin (a pipe, as in a script). */
function cliWithInput(args: string[], input: string): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = execFile(process.execPath, [CLI, ...args], { timeout: 30_000 }, (err, stdout, stderr) =>
      resolve({ code: err ? Number(err.code ?? 1) : 0, stdout: String(stdout), stderr: String(stderr) }),
    );
    child.stdin!.end(input);
  });
}

const BCRYPT_PASSWORD = 'htpasswd-secret-1';
const ARGON_PASSWORD = 'argon-secret-2';

describe('hashed passwords', () => {
  let ds: Downstream;
  let proxy: RunningProxy;
  let bcryptHash: string;
  let argonHash: string;

  beforeAll(async () => {
    ds = await startDownstream();
    const htpasswd = await run('htpasswd', ['-nbB', 'bcrypt@user.com', BCRYPT_PASSWORD]);
    expect(htpasswd.code).toBe(0);
    bcryptHash = htpasswd.stdout.trim().split(':').slice(1).join(':');
    expect(bcryptHash).toMatch(/^\$2y\$/);
    const hashed = await cliWithInput(['hash-password'], `${ARGON_PASSWORD}\n`);
    expect(hashed).toMatchObject({ code: 0 });
    argonHash = hashed.stdout.trim();
    expect(argonHash).toMatch(/^\$argon2id\$/);
    const downstreams = [{ name: 'only', addr: ds.addr }];
    proxy = await startProxy({
      'config.yaml': testConfig({
        ...TEST_LIMITS,
        login_penalty: { failure_delay_ms: 50, free_failures: 20, lockout_failures: 40 },
        users: [
          { email: 'bcrypt@user.com', password: bcryptHash, selector: 'round-robin.js', downstreams },
          { email: 'argon@user.com', password: argonHash, selector: 'round-robin.js', downstreams },
          { email: 'dovecot@user.com', password: `{BLF-CRYPT}${bcryptHash}`, selector: 'round-robin.js', downstreams },
          { email: 'plain@user.com', password: 'plain-secret-3', selector: 'round-robin.js', downstreams },
        ],
      }),
    });
  });
  afterAll(async () => {
    await proxy?.stop();
    await ds?.close();
  });

  const login = (user: string, pass: string) => swaks(proxy.port, ['--auth-user', user, '--auth-password', pass]);

  test('a bcrypt hash from htpasswd -nbB ($2y$) logs in with its cleartext, also with Dovecot’s {BLF-CRYPT} prefix', async () => {
    expect((await login('bcrypt@user.com', BCRYPT_PASSWORD)).stdout).toMatch(/235 /);
    expect((await login('dovecot@user.com', BCRYPT_PASSWORD)).stdout).toMatch(/235 /);
  });

  test('an argon2id hash from smtpmux hash-password logs in with its cleartext', async () => {
    const result = await login('argon@user.com', ARGON_PASSWORD);
    expect(result.stdout).toMatch(/235 /);
    expect(result.code).toBe(0);
  });

  test('the hash strings themselves are not accepted as passwords', async () => {
    expect((await login('bcrypt@user.com', bcryptHash)).stdout).toMatch(/535 5\.7\.8 /);
    expect((await login('argon@user.com', argonHash)).stdout).toMatch(/535 5\.7\.8 /);
  });

  test('a plaintext password still works, and the start-up log names its user in a warning', async () => {
    expect((await login('plain@user.com', 'plain-secret-3')).stdout).toMatch(/235 /);
    const warning = proxy.logs.find((l) => l.level === 40 && String(l.msg).startsWith('plaintext password'));
    expect(warning?.msg).toMatch(/plain@user\.com/);
    expect(warning?.msg).not.toMatch(/bcrypt@user\.com|argon@user\.com/);
  });

  test('an unknown login is logged as a short hash, never verbatim', async () => {
    const smtp = await connectRaw(proxy.port);
    try {
      await smtp.command('EHLO client.example');
      // A user who typed the password into the login field.
      const reply = await smtp.command(`AUTH PLAIN ${plainAuth('Sup3r-Secret-Typed-Here', 'x')}`);
      expect(reply.code).toBe(535);
    } finally {
      smtp.close();
    }
    expect(proxy.logText()).not.toContain('Sup3r-Secret-Typed-Here');
    const line = proxy.logs.find((l) => l.msg === 'authentication failed' && l.loginHash);
    expect(line?.loginHash).toMatch(/^[0-9a-f]{12}$/);
  });

  test('Dovecot prefixes and hash schemes are told apart; a truncated hash is a config error, not a plaintext password', async () => {
    expect(classifyPassword(`{ARGON2ID}${argonHash}`)).toEqual({ scheme: 'argon2id', hash: argonHash });
    expect(await storedPassword(`{ARGON2ID}${argonHash}`).verify(ARGON_PASSWORD)).toBe(true);
    expect(classifyPassword('{PLAIN}hello')).toEqual({ scheme: 'plain', hash: 'hello' });
    expect(storedPassword(bcryptHash).id).not.toBe(storedPassword(argonHash).id);
    const text = testConfig({ selector: 'round-robin.js', downstreams: [{ addr: '127.0.0.1:25' }], password: bcryptHash.slice(0, 30) });
    const failure = await parseConfig(text, path.join(proxy.dir, 'broken.yaml'), {}).catch((e: unknown) => e);
    expect(failure).toBeInstanceOf(ConfigError);
    expect((failure as ConfigError).problems.join('\n')).toMatch(/users\[0\]\.password: looks like a password hash but is not a valid/);
    expect((failure as ConfigError).problems.join('\n')).not.toContain(bcryptHash.slice(0, 30));
  });

  test('a config error never echoes a value that came from ${ENV}', async () => {
    const text = testConfig({ selector: 'round-robin.js', downstreams: [{ addr: '127.0.0.1:25' }], max_message_size: '${SECRET_SIZE}' });
    const failure = (await parseConfig(text, path.join(proxy.dir, 'env.yaml'), { SECRET_SIZE: 'hunter2-from-env' }).catch((e: unknown) => e)) as ConfigError;
    expect(failure).toBeInstanceOf(ConfigError);
    const problems = failure.problems.join('\n');
    expect(problems).toMatch(/max_message_size: .*\$\{SECRET_SIZE\}/);
    expect(problems).not.toContain('hunter2');
  });

  test('smtpmux hash-password on a terminal asks twice and echoes nothing typed', async () => {
    // A real pseudo-terminal (python's pty): type the password as soon as each prompt shows.
    const driver = `
import os, pty, sys, time, select
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], [sys.argv[1], sys.argv[2], 'hash-password'])
out = b''
def read_until(token, timeout=20):
    global out
    end = time.time() + timeout
    while token not in out and time.time() < end:
        if select.select([fd], [], [], 0.2)[0]:
            try: out += os.read(fd, 4096)
            except OSError: break
for prompt in (b'Password: ', b'Again: '):
    read_until(prompt)
    os.write(fd, b'typed-secret-77\\r')
read_until(b'$argon2id$')
read_until(b'\\n', 5)
os.waitpid(pid, 0)
sys.stdout.write(out.decode('utf8', 'replace'))
`;
    const result = await run('python3', ['-c', driver, process.execPath, CLI]);
    expect(result.stdout).toMatch(/Password: /);
    expect(result.stdout).toMatch(/Again: /);
    expect(result.stdout).not.toContain('typed-secret-77');
    const hash = /\$argon2id\$\S+/.exec(result.stdout)?.[0] ?? '';
    expect(await storedPassword(hash).verify('typed-secret-77')).toBe(true);
  });

  test('smtpmux hash-password refuses an empty password', async () => {
    const result = await cliWithInput(['hash-password'], '\n');
    expect(result.code).toBe(1);
    expect(result.stdout).toBe('');
    expect(result.stderr).toMatch(/empty/);
  });
});
