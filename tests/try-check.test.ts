// The selector authoring kit as a separate process: `smtpmux try` prints what a selector decides with
// simulated downstream outcomes and delivers nothing unless --deliver; `smtpmux check` names every
// problem, with the selector's own file:line:col.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startDownstream, subjectOf, type Downstream } from './support/downstream';
import { envWithout, runCli } from './support/cli';
import { testConfig, type ConfigSpec } from './support/config';

let dir: string;
let ds: Record<'a' | 'b' | 'c', Downstream>;
let configFile: string;

const env = envWithout('SMTPMUX_CONFIG', 'SMTPMUX_PORT', 'SMTPMUX_HOST');
const cli = (args: string[]): ReturnType<typeof runCli> => runCli(args, { env });

function write(name: string, text: string): string {
  const file = path.join(dir, name);
  writeFileSync(file, text);
  return file;
}

function configText(users: { email: string; selector: string; names: ('a' | 'b' | 'c')[]; password?: string }[], extra: ConfigSpec = {}): string {
  return testConfig({
    delivery: { connect_timeout_ms: 2000, socket_timeout_ms: 10000 },
    ...extra,
    users: users.map((u) => ({ email: u.email, password: u.password ?? 'pw', selector: u.selector, downstreams: u.names.map((n) => ({ name: n, addr: ds[n].addr })) })),
  });
}

const delivered = (): number => ds.a.received.length + ds.b.received.length + ds.c.received.length;
const connections = (): number => ds.a.connections() + ds.b.connections() + ds.c.connections();

beforeAll(async () => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'smtpmux-try-'));
  ds = { a: await startDownstream(), b: await startDownstream(), c: await startDownstream() };
  configFile = write(
    'config.yaml',
    configText([
      { email: 'rr@user.com', selector: 'round-robin.js', names: ['a', 'b', 'c'] },
      { email: 'wf@user.com', selector: 'waterfall.js', names: ['a', 'b'] },
    ]),
  );
});
afterAll(async () => {
  for (const server of Object.values(ds)) await server.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('smtpmux try', () => {
  test('--times 3 shows the order a round-robin selector returns, rotating, and delivers nothing', async () => {
    const result = await cli(['try', '--config', configFile, '--times', '3']);
    expect(result.code).toBe(0);
    expect(result.stdout).toMatch(/round-robin\.js for rr@user\.com; downstreams: a, b, c/);
    const orders = [...result.stdout.matchAll(/returned order: (.*)/g)].map((m) => m[1]);
    expect(orders).toEqual(['a → b → c', 'b → c → a', 'c → a → b']);
    expect([...result.stdout.matchAll(/reply: (.*)/g)].map((m) => m[1])).toEqual([
      '250 delivered via a (simulated)',
      '250 delivered via b (simulated)',
      '250 delivered via c (simulated)',
    ]);
    expect(delivered()).toBe(0);
    expect(connections()).toBe(0);
  });

  test('--fail NAME shows a waterfall falling through to the next downstream', async () => {
    const result = await cli(['try', '-c', configFile, '-u', 'wf@user.com', '--fail', 'a']);
    expect(result.code).toBe(0);
    expect(result.stdout).toMatch(/send\("a"\) → \S+ 451 \(temporary\)/);
    expect(result.stdout).toMatch(/send\("b"\) → accepted by b/);
    expect(result.stdout.indexOf('send("a")')).toBeLessThan(result.stdout.indexOf('send("b")'));
    expect(result.stdout).toMatch(/reply: 250 delivered via b \(simulated\)/);
    expect(delivered()).toBe(0);
  });

  test('--fail a:perm --fail b:perm exits 1 and prints a 5xx reply', async () => {
    const result = await cli(['try', '-c', configFile, '-u', 'wf@user.com', '--fail', 'a:perm', '--fail', 'b:perm']);
    expect(result.code).toBe(1);
    expect(result.stdout).toMatch(/send\("a"\) → \S+ 550 \(permanent\)/);
    expect(result.stdout).toMatch(/send\("b"\) → \S+ 550 \(permanent\)/);
    expect(result.stdout).toMatch(/reply: 5\d\d 5\.\d+\.\d+ /);
    expect(delivered()).toBe(0);
  });

  test('--fail on an order-returning selector fails over through the returned order', async () => {
    const result = await cli(['try', '-c', configFile, '--fail', 'a', '--fail', 'b:perm']);
    expect(result.code).toBe(0);
    expect(result.stdout).toMatch(/returned order: a → b → c/);
    expect(result.stdout).toMatch(/tried a: \S+ 451[\s\S]*tried b: \S+ 550[\s\S]*tried c: accepted/);
    expect(result.stdout).toMatch(/reply: 250 delivered via c \(simulated\)/);
  });

  test('--json prints one parseable JSON object per message', async () => {
    const result = await cli(['try', '-c', configFile, '--json', '--times', '2', '--subject', 'json please']);
    expect(result.code).toBe(0);
    const lines = result.stdout.trim().split('\n');
    expect(lines).toHaveLength(2);
    const parsed = lines.map((l) => JSON.parse(l) as { message: number; outcome: { kind: string; targets: string[] }; reply: string; attempts: { downstream: string; ok: boolean }[] });
    expect(parsed.map((p) => p.message)).toEqual([1, 2]);
    expect(parsed.map((p) => p.outcome)).toEqual([
      { kind: 'order', targets: ['a', 'b', 'c'] },
      { kind: 'order', targets: ['b', 'c', 'a'] },
    ]);
    expect(parsed[0].attempts).toMatchObject([{ downstream: 'a', ok: true }]);
    expect(parsed[1].reply).toBe('250 delivered via b (simulated)');
  });

  test('an unknown user exits 2 and names the users there are', async () => {
    const result = await cli(['try', '-c', configFile, '-u', 'nobody@user.com']);
    expect(result.code).toBe(2);
    expect(result.stderr).toMatch(/no user "nobody@user\.com"/);
    expect(result.stderr).toMatch(/rr@user\.com, wf@user\.com/);
  });

  test('a selector that does not compile: try exits 1 and names file:line:col, without a stack trace', async () => {
    const sel = write('try-broken.js', `function select() {\n  return ['a'];\n}\nselect(;\n`);
    const file = write('try-broken.yaml', configText([{ email: 'rr@user.com', selector: 'try-broken.js', names: ['a'] }]));
    const result = await cli(['try', '-c', file]);
    expect(result.code).toBe(1);
    expect(result.stderr).toContain(`${sel}:4:8: SyntaxError`);
    expect(result.stderr).not.toMatch(/\n\s+at /);
  });

  test('a config with a problem: try exits 1 and prints it as file:key', async () => {
    const file = write('try-bad-config.yaml', configText([{ email: 'rr@user.com', selector: 'round-robin.js', names: ['a'] }], { limits: { max_sends: 'lots' } }));
    const result = await cli(['try', '-c', file]);
    expect(result.code).toBe(1);
    expect(result.stderr).toMatch(/try-bad-config\.yaml:limits\.max_sends: /);
    expect(result.stderr).not.toMatch(/\n\s+at /);
  });

  test('nothing was delivered by any of the above; --deliver delivers exactly one message through the real route', async () => {
    expect(delivered()).toBe(0);
    expect(connections()).toBe(0);
    const result = await cli(['try', '-c', configFile, '--deliver', '--subject', 'delivered by try']);
    expect(result.code).toBe(0);
    expect(result.stdout).toMatch(/message 1: delivered via a/);
    expect(delivered()).toBe(1);
    expect(ds.a.received.map((r) => subjectOf(r.raw))).toEqual(['delivered by try']);
  });
});

describe('smtpmux check', () => {
  test('a good config exits 0 and says what it compiled', async () => {
    const result = await cli(['check', '-c', configFile]);
    expect(result.code).toBe(0);
    expect(result.stdout).toMatch(/OK \(2 user\(s\), 5 downstream\(s\), 2 selector\(s\) compiled\)/);
  });

  test("a selector's syntax error is reported as file:line:col, exit 1", async () => {
    const sel = write('syntax.js', `// a typo on line 5\nfunction select(message, downstreams) {\n  return downstreams;\n}\nconst x = {;\n`);
    const result = await cli(['check', '-c', write('syntax.yaml', configText([{ email: 'rr@user.com', selector: 'syntax.js', names: ['a'] }]))]);
    expect(result.code).toBe(1);
    expect(result.stderr).toContain(`${sel}:5:12: SyntaxError`);
  });

  test('a selector that throws while loading is reported with its location, exit 1', async () => {
    const sel = write('throws.js', `function select() { return ['a']; }\nconst settings = undefined;\nconst weight = settings.weight;\n`);
    const result = await cli(['check', '-c', write('throws.yaml', configText([{ email: 'rr@user.com', selector: 'throws.js', names: ['a'] }]))]);
    expect(result.code).toBe(1);
    expect(result.stderr).toMatch(new RegExp(`${sel.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}:3:\\d+: TypeError: .*weight`));
  });

  test('a config with two problems lists both, each as file:key', async () => {
    const text = configText([{ email: 'rr@user.com', selector: 'round-robin.js', names: ['a'], password: '' }], { limits: { selector_timeout_ms: 'soon' } });
    const result = await cli(['check', '-c', write('two.yaml', text)]);
    expect(result.code).toBe(1);
    expect(result.stderr).toMatch(/2 problem\(s\)/);
    expect(result.stderr).toMatch(/two\.yaml:limits\.selector_timeout_ms: /);
    expect(result.stderr).toMatch(/two\.yaml:users\[0\]\.password: /);
  });
});
