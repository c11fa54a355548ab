// The config file: every problem reported at once as `file:key: what is wrong`, ${ENV} substitution,
// the environment overrides, the Go original's keys and plugin paths, and `smtpmux check` as a process.
import { mkdtempSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BUNDLED_SELECTORS, ConfigError, parseConfig, type Config } from '../src/config/load';
import { runCli } from './support/cli';

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'smtpmux-config-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function write(name: string, text: string): string {
  const file = path.join(dir, name);
  mkdirSync(path.dirname(file), { recursive: true });
  writeFileSync(file, text);
  return file;
}

/** How parseConfig names a file in its messages: relative to the working directory. */
const shown = (file: string): string => path.relative(process.cwd(), file);

async function problemsOf(text: string, file: string, env: Record<string, string> = {}): Promise<readonly string[]> {
  try {
    await parseConfig(text, file, env);
  } catch (err) {
    if (err instanceof ConfigError) return err.problems;
    throw err;
  }
  throw new Error('the config was accepted');
}

const GOOD = `listen:
  host: 127.0.0.1
  port: 2525
allow_insecure_auth: true
users:
  - email: app@example.com
    password: app-password
    selector: round-robin.js
    downstreams:
      - addr: "smtp.example.com:587"
        user: relay
        pass: relay-pass
`;

const MANY_ERRORS = `listen:
  port: 99999
allow_insecure_auth: "yes"
max_message_size: 12 parsecs
limits:
  selector_timeout_ms: 5
  colour: blue
users:
  - email: ""
    password: pw
    selector: round-robin.js
    downstreams:
      - addr: "no-port-here"
        user: only-user
  - email: b@example.com
    password: \${MISSING_SECRET}
    downstreams: []
  - email: c@example.com
    password: pw
    selector: does-not-exist.js
    downstreams:
      - addr: "a.example:25"
`;

/** Every problem MANY_ERRORS has: the key, and something the message must say. */
const EXPECTED: [string, RegExp][] = [
  ['listen.port', /65535/],
  ['allow_insecure_auth', /boolean/],
  ['max_message_size', /"12 parsecs" is not a size/],
  ['limits.selector_timeout_ms', />=\s*10/],
  ['limits', /colour/],
  ['users[0].email', /must not be empty/],
  ['users[0].downstreams[0].addr', /host:port/],
  ['users[0].downstreams[0].pass', /user and pass go together/],
  ['users[1].password', /environment variable MISSING_SECRET is not set/],
  ['users[1].downstreams', /at least one downstream/],
  ['users[1].selector', /name a selector/],
  ['users[2].selector', /"does-not-exist.js" not found/],
];

describe('config', () => {
  test('a config with several errors lists every one of them as file:key: message', async () => {
    const file = write('many-errors.yaml', MANY_ERRORS);
    const problems = await problemsOf(MANY_ERRORS, file);
    for (const problem of problems) expect(problem).toMatch(/^[^:]+\.yaml:[^:\s]+: \S/);
    for (const [key, says] of EXPECTED) {
      const found = problems.filter((p) => p.startsWith(`${shown(file)}:${key}: `));
      expect({ key, found: found.some((p) => says.test(p)), problems }).toMatchObject({ key, found: true });
    }
  });

  test('smtpmux check on a config with several errors exits non-zero with every problem on stderr', async () => {
    const file = write('many-errors-cli.yaml', MANY_ERRORS);
    const result = await runCli(['check', '--config', file]);
    expect(result.code).not.toBe(0);
    expect(result.stderr).toMatch(/the config has \d+ problem/);
    for (const [key, says] of EXPECTED) {
      const line = result.stderr.split('\n').find((l) => l.includes(`many-errors-cli.yaml:${key}: `) && says.test(l));
      expect({ key, line }).toMatchObject({ key, line: expect.any(String) });
    }
    expect(result.stdout).not.toMatch(/OK/);
  });

  test('a YAML syntax error is reported with file:line:col', async () => {
    const file = write('not-yaml.yaml', 'users:\n  - email: a@b.c\n   password: [unclosed\n');
    const problems = await problemsOf('users:\n  - email: a@b.c\n   password: [unclosed\n', file);
    expect(problems[0]).toMatch(new RegExp(`^${shown(file).replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}:\\d+:\\d+: YAML: `));
  });

  test('${ENV} values are substituted, with defaults and $${ escapes', async () => {
    const text = GOOD.replace('app-password', '${APP_PASSWORD}')
      .replace('relay-pass', '"${RELAY_PASS}"')
      .replace('smtp.example.com:587', '${RELAY_HOST:-fallback.example.com}:${RELAY_PORT}')
      .replace('user: relay', () => 'user: "$${NOT_A_VAR}"');
    const config = await parseConfig(text, write('env.yaml', text), { APP_PASSWORD: 'from-env', RELAY_PASS: 'secret from env', RELAY_PORT: '2587' });
    const [user] = config.users;
    expect(user.password).toBe('from-env');
    expect(user.downstreams[0]).toMatchObject({ pass: 'secret from env', addr: 'fallback.example.com:2587', host: 'fallback.example.com', port: 2587, user: '${NOT_A_VAR}' });
  });

  test('a missing environment variable is an error naming the key and the variable', async () => {
    const text = GOOD.replace('relay-pass', '${RELAY_PASS}');
    const file = write('env-missing.yaml', text);
    const problems = await problemsOf(text, file, {});
    expect(problems).toEqual([`${shown(file)}:users[0].downstreams[0].pass: environment variable RELAY_PASS is not set (line 12)`]);
  });

  test('SMTPMUX_PORT overrides listen.port, and a bad one is reported', async () => {
    const file = write('port.yaml', GOOD);
    const config: Config = await parseConfig(GOOD, file, { SMTPMUX_PORT: '2600' });
    expect(config.listen).toEqual({ host: '127.0.0.1', port: 2600 });
    expect((await parseConfig(GOOD, file, {})).listen.port).toBe(2525);
    const problems = await problemsOf(GOOD, file, { SMTPMUX_PORT: 'twenty-five' });
    expect(problems).toEqual([expect.stringMatching(new RegExp(`^${shown(file)}:listen\\.port: `))]);
  });

  test('USE_INSECURE_AUTH=true turns allow_insecure_auth on', async () => {
    const text = GOOD.replace('allow_insecure_auth: true', 'allow_insecure_auth: false');
    const file = write('insecure.yaml', text);
    expect((await parseConfig(text, file, {})).allowInsecureAuth).toBe(false);
    expect((await parseConfig(text, file, { USE_INSECURE_AUTH: 'true' })).allowInsecureAuth).toBe(true);
  });

  test('the Go original’s selector_algo_path is accepted, beside the config and in the bundled library', async () => {
    write('mine.js', 'function select(m, d) { return d; }');
    const bundled = GOOD.replace('selector: round-robin.js', 'selector_algo_path: round-robin.js');
    expect((await parseConfig(bundled, write('legacy.yaml', bundled), {})).users[0].selectorPath).toBe(path.join(BUNDLED_SELECTORS, 'round-robin.js'));
    const local = GOOD.replace('selector: round-robin.js', 'selector_algo_path: ./mine.js');
    expect((await parseConfig(local, write('legacy-local.yaml', local), {})).users[0].selectorPath).toBe(path.join(dir, 'mine.js'));
    const bare = GOOD.replace('selector: round-robin.js', 'selector_algo_path: waterfall');
    expect((await parseConfig(bare, write('legacy-bare.yaml', bare), {})).users[0].selectorPath).toBe(path.join(BUNDLED_SELECTORS, 'waterfall.js'));
  });

  test('a Go plugin path maps to the bundled round-robin selector, with a warning', async () => {
    const text = GOOD.replace('selector: round-robin.js', 'selector_algo_path: ./plugins/round_robin/round-robin-plugin');
    const config = await parseConfig(text, write('go-plugin.yaml', text), {});
    expect(config.users[0].selectorPath).toBe(path.join(BUNDLED_SELECTORS, 'round-robin.js'));
    expect(config.warnings).toEqual([expect.stringMatching(/users\[0\]\.selector_algo_path: .*Go plugin.*round-robin\.js/)]);
    const so = GOOD.replace('selector: round-robin.js', 'selector_algo_path: plugins/roundrobin.so');
    expect((await parseConfig(so, write('go-plugin-so.yaml', so), {})).users[0].selectorPath).toBe(path.join(BUNDLED_SELECTORS, 'round-robin.js'));
  });

  test('a Go plugin or Starlark file still on disk where the original kept it maps to the bundled selector, and a file that is not JavaScript is refused by name', async () => {
    write('plugins/round_robin/round-robin-plugin', '\x7fELF\x02\x01\x01\0binary');
    write('round_robin.star', 'def selector(downstreams):\n    return None\n');
    for (const given of ['./plugins/round_robin/round-robin-plugin', 'round_robin.star']) {
      const text = GOOD.replace('selector: round-robin.js', `selector_algo_path: ${given}`);
      const config = await parseConfig(text, write('in-place.yaml', text), {});
      expect(config.users[0].selectorPath).toBe(path.join(BUNDLED_SELECTORS, 'round-robin.js'));
      expect(config.warnings).toEqual([expect.stringMatching(/Go plugin or Starlark script/)]);
    }
    write('router.star', 'def selector(downstreams):\n    return None\n');
    const text = GOOD.replace('selector: round-robin.js', 'selector: router.star');
    const file = write('not-js.yaml', text);
    await expect(parseConfig(text, file, {})).rejects.toThrow(/users\[0\]\.selector: .*router\.star is not a JavaScript file/);
  });

  test('smtpmux check reports a selector with a syntax error as file:line:col and exits non-zero', async () => {
    const broken = write('broken.js', 'function select(message, downstreams) {\n  const x = 1;\n  return downstreams[0] +;\n}\n');
    write('throws.js', 'function select(m, d) { return d[0]; }\nnull.boom;\n');
    const text = `${GOOD}  - email: second@example.com
    password: pw
    selector: throws.js
    downstreams:
      - addr: "smtp.example.com:587"
`.replace('selector: round-robin.js', 'selector: broken.js');
    const result = await runCli(['check', '--config', write('broken-selector.yaml', text)]);
    expect(result.code).not.toBe(0);
    expect(result.stderr).toContain(`${broken}:3:26: SyntaxError: Unexpected token ';'`);
    // A script that fails while loading is reported too, at the line that threw.
    expect(result.stderr).toMatch(new RegExp(`${path.join(dir, 'throws.js').replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}:2:\\d+: TypeError`));
  });

  test('smtpmux check on a good config exits 0', async () => {
    const file = write('good.yaml', GOOD);
    const result = await runCli(['check', '--config', file]);
    expect(result).toMatchObject({ code: 0, stderr: '' });
    expect(result.stdout).toContain(`${file}: OK (1 user(s), 1 downstream(s), 1 selector(s) compiled)`);
  });

  test('smtpmux check finds the config through SMTPMUX_CONFIG', async () => {
    const file = write('from-env.yaml', GOOD);
    const result = await runCli(['check'], { env: { ...process.env, SMTPMUX_CONFIG: file } });
    expect(result.code).toBe(0);
    expect(result.stdout).toContain(`${file}: OK`);
  });
});

describe('downstream limits', () => {
  test('rate, quota, count, cooldown, from and account are read into numbers; a bad one is named by key', async () => {
    const text = GOOD.replace('        pass: relay-pass\n', '        pass: relay-pass\n        rate: 14/s\n        quota: 200/24h\n        count: recipients\n        cooldown: 60s\n        cooldown_max: 10m\n        from: noreply@verified.example\n        account: ses-main\n');
    const config = await parseConfig(text, write('limits.yaml', text), {});
    expect(config.users[0].downstreams[0]).toMatchObject({
      rate: { limit: 14, periodMs: 1000 },
      quota: { limit: 200, periodMs: 86_400_000 },
      count: 'recipients',
      cooldown: { baseMs: 60_000, maxMs: 600_000 },
      from: 'noreply@verified.example',
      account: 'ses-main',
    });
    expect(config.delivery.rateWaitMs).toBe(1000);

    const bad = GOOD.replace('        pass: relay-pass\n', '        pass: relay-pass\n        rate: fast\n        quota: 0/d\n        cooldown: soon\n        from: "Name <a@b>"\n');
    const file = write('bad-limits.yaml', bad);
    const problems = await problemsOf(bad, file);
    for (const key of ['rate', 'quota', 'cooldown', 'from']) expect(problems).toContainEqual(expect.stringContaining(`users[0].downstreams[0].${key}:`));
    expect(problems.join('\n')).toMatch(/"fast": write a rate as N\/<period>, e\.g\. 14\/s/);
  });
});
