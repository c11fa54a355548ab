// Hot reload while mail flows (issue 3): the selector and the config change under a running proxy in
// every way files really change — rename-over, in-place write, a syntax error, a fix, a deletion, a
// return, a Kubernetes ConfigMap `..data` swap, a rotated downstream password, a new user — and every
// message still gets 250 from the version that was active while it ran. Then the details: what the
// reload line says, settings that need a restart, where a failed reload points, bursts of saves, and
// messages that are inside a slow selector when the reload happens.
import { unlinkSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { startDownstream, subjectOf, type Downstream } from './support/downstream';
import { sendWithNodemailer, type Sent } from './support/clients';
import {
  ConfigMapDir,
  fixedSelector,
  isReloadFailed,
  isReloaded,
  isReloadOutcome,
  logTime,
  renameOver,
  sleep,
  startAuthDownstream,
  startSlowDownstream,
  startWatched,
  tempDir,
  until,
  waitForLog,
  writeIn,
  type AuthDownstream,
  type LogLine,
  type WatchedProxy,
} from './support/reload';
import { testConfig, type ConfigSpec } from './support/config';

const open: { close(): Promise<void> }[] = [];
afterEach(async () => {
  for (const item of open.splice(0).reverse()) await item.close();
});

function track<T extends { close(): Promise<void> }>(item: T): T {
  open.push(item);
  return item;
}

async function downstream(): Promise<Downstream> {
  return track(await startDownstream());
}

async function watched(dir: string, options?: Parameters<typeof startWatched>[1]): Promise<WatchedProxy> {
  const p = await startWatched(dir, options);
  open.push({ close: () => p.stop() });
  return p;
}

type UserSpec = {
  email: string;
  password: string;
  selector: string;
  downstreams: { name: string; addr: string; user?: string; pass?: string }[];
};

const SETTINGS = {
  limits: { selector_timeout_ms: 10000, selector_memory_mb: 32 },
  delivery: { connect_timeout_ms: 2000, socket_timeout_ms: 30000, max_connections: 2 },
};

function yamlConfig(users: UserSpec[], options: ConfigSpec = {}): string {
  return testConfig({ ...SETTINGS, ...options, users });
}

const USER1 = { user: 'test@user.com', pass: 'password123' };

describe('hot reload while mail flows', () => {
  test('rename-over, in-place write, syntax error, fix, delete, return, ConfigMap swaps, password rotation and a new user: every message 250, from the version active while it ran', async () => {
    // One downstream per selector version, so where a message landed says which version routed it.
    const names = ['d0', 'd1', 'd2', 'd3', 'd4', 'd6', 'd7'] as const;
    const ds: Record<string, Downstream> = {};
    for (const name of names) ds[name] = await downstream();
    const p = track(await startAuthDownstream('relay', ['old-secret']));
    const u = await downstream(); // user2's only downstream: never touched by any reload
    const n = await downstream(); // the new user's

    const user1 = (pass: string): UserSpec => ({
      ...{ email: USER1.user, password: USER1.pass },
      selector: 'SELECTOR',
      downstreams: [...names.map((name) => ({ name, addr: ds[name].addr })), { name: 'p', addr: p.addr, user: 'relay', pass }],
    });
    const user2: UserSpec = { email: 'steady@user.com', password: 'steady-pw', selector: 'u.js', downstreams: [{ name: 'u', addr: u.addr }] };
    const user3: UserSpec = { email: 'newbie@user.com', password: 'newbie-pw', selector: 'n.js', downstreams: [{ name: 'n', addr: n.addr }] };
    const configWith = (selector: string, pass: string, extra: UserSpec[] = []): string =>
      yamlConfig([{ ...user1(pass), selector }, user2, ...extra]);

    // The folder as a ConfigMap mount: config.yaml, u.js and cm.js are symlinks into ..data; selector.js is
    // a plain file beside them, edited the ways editors edit.
    const dir = tempDir();
    const cm = new ConfigMapDir(dir);
    const U_JS = fixedSelector('u', 'user2: always u');
    cm.init({ 'config.yaml': configWith('selector.js', 'old-secret'), 'u.js': U_JS, 'cm.js': fixedSelector('d0', 'unused in version a') });
    const selectorFile = writeIn(dir, 'selector.js', fixedSelector('d0', 'v0'));
    const proxy = await watched(dir);
    const { logs } = proxy;

    // Version timeline: when (log time) user1's routing switched to which downstream.
    const timeline: { time: number; target: string; step: string }[] = [{ time: 0, target: 'd0', step: 'start' }];
    const rank = ['d0', 'd1', 'd2', 'd4', 'd6', 'd7', 'p'];

    // The streams: two concurrent sequential streams for user1 and a slower one for user2.
    interface Result extends Sent {
      readonly stream: string;
      readonly subject: string;
      readonly start: number;
      readonly end: number;
    }
    const results: Result[] = [];
    let stopping = false;
    const runStream = async (stream: string, auth: { user: string; pass: string }, paceMs: number, max: number): Promise<void> => {
      for (let i = 0; i < max && !stopping; i++) {
        const subject = `${stream}-${i}`;
        const start = Date.now();
        const sent = await sendWithNodemailer(proxy.port, { subject }, auth);
        results.push({ ...sent, stream, subject, start, end: Date.now() });
        await sleep(paceMs);
      }
    };
    const streams = [
      runStream('a', USER1, 30, 400),
      runStream('b', USER1, 45, 400),
      // Fewer than nodemailer's 100 messages per pooled connection, so one connection must carry them all.
      runStream('s', { user: user2.email, pass: user2.password }, 150, 90),
    ];

    /** Waits until user1 has finished `count` messages that started after `since`. */
    const flowAfter = (since: number, count = 3): Promise<void> =>
      until(() => results.filter((r) => r.stream !== 's' && r.start > since).length >= count, `${count} user1 messages after ${since}`, 15_000);

    /** Makes a change and waits for the reload it causes; returns the reload's log line. */
    const step = async (name: string, change: () => void, expect: 'reloaded' | 'failed', target?: string): Promise<LogLine> => {
      const from = logs.length;
      change();
      const { line } = await waitForLog(logs, from, expect === 'reloaded' ? isReloaded : isReloadFailed, `${name}: ${expect}`);
      if (expect === 'reloaded' && target) timeline.push({ time: logTime(line), target, step: name });
      await flowAfter(logTime(line));
      return line;
    };

    try {
      await flowAfter(0);
      await until(() => u.received.length > 0, 'user2 reaching u');
      expect(u.connections()).toBe(1);

      // 1. An editor's save: temp file renamed over the selector.
      const renamed = await step('rename-over', () => renameOver(selectorFile, fixedSelector('d1', 'v1')), 'reloaded', 'd1');
      expect(renamed).toMatchObject({ reason: 'file changed', selectorsCompiled: [selectorFile], usersAdded: [], usersRemoved: [] });
      expect(typeof renamed.ms).toBe('number');

      // 2. Written in place.
      await step('in-place', () => writeFileSync(selectorFile, fixedSelector('d2', 'v2')), 'reloaded', 'd2');

      // 3. Broken: this version would route to d3, but it never compiles, so it never serves.
      const brokenSource = `// v3: broken on purpose\nconst target = 'd3';\nfunction select(message, downstreams) {\n  return [target];\n}\nlet broken = ;\n`;
      const broken = await step('syntax error', () => renameOver(selectorFile, brokenSource), 'failed');
      expect(broken.level).toBe(50);
      expect((broken.problems as string[]).join('\n')).toContain(`${selectorFile}:6:14: SyntaxError`);

      // 4. Fixed: recovers by itself.
      await step('fix', () => renameOver(selectorFile, fixedSelector('d4', 'v4')), 'reloaded', 'd4');

      // 5. Deleted: the last good version (d4) keeps serving, with a warning.
      const deleted = await step('delete', () => unlinkSync(selectorFile), 'failed');
      expect(deleted.level).toBe(40);
      expect(String(deleted.reason)).toMatch(/^file missing: /);
      expect((deleted.problems as string[]).join('\n')).toMatch(/selector\.js.*not found/);
      const deletedAt = logTime(deleted);

      // 6. Back again.
      const back = await step('return', () => writeFileSync(selectorFile, fixedSelector('d6', 'v6')), 'reloaded', 'd6');
      const returnedAt = logTime(back);

      // 7. ConfigMap update: the config now gives user1 the ConfigMap's cm.js (routing to d7).
      const swapped = await step(
        'configmap a→b',
        () => cm.swap({ 'config.yaml': configWith('cm.js', 'old-secret'), 'u.js': U_JS, 'cm.js': fixedSelector('d7', 'v7') }, '..2026_01_01_b'),
        'reloaded',
        'd7',
      );
      expect(swapped).toMatchObject({ usersChanged: [USER1.user], selectorsCompiled: [path.join(dir, 'cm.js')], poolsOpened: 0, poolsClosed: 0 });

      // 8. ConfigMap update where only the selector behind the symlink changes (config.yaml is identical).
      const selectorOnly = await step(
        'configmap b→c',
        () => cm.swap({ 'config.yaml': configWith('cm.js', 'old-secret'), 'u.js': U_JS, 'cm.js': fixedSelector('p', 'v8') }, '..2026_01_01_c'),
        'reloaded',
        'p',
      );
      expect(selectorOnly).toMatchObject({ usersChanged: [], selectorsCompiled: [path.join(dir, 'cm.js')] });

      // 9. The relay's password rotates: it accepts both while the config changes, then only the new one.
      p.accept(['old-secret', 'new-secret']);
      const rotated = await step(
        'password',
        () => cm.swap({ 'config.yaml': configWith('cm.js', 'new-secret'), 'u.js': U_JS, 'cm.js': fixedSelector('p', 'v8') }, '..2026_01_01_d'),
        'reloaded',
        'p',
      );
      expect(rotated).toMatchObject({ usersChanged: [USER1.user], poolsOpened: 1, poolsClosed: 1, selectorsCompiled: [] });
      p.accept(['new-secret']);
      const restrictedAt = Date.now();
      await flowAfter(restrictedAt);

      // 10. A new user, who can log in and send at once.
      const added = await step(
        'add user',
        () =>
          cm.swap(
            { 'config.yaml': configWith('cm.js', 'new-secret', [user3]), 'u.js': U_JS, 'cm.js': fixedSelector('p', 'v8'), 'n.js': fixedSelector('n') },
            '..2026_01_01_e',
          ),
        'reloaded',
        'p',
      );
      expect(added).toMatchObject({ usersAdded: [user3.email], usersRemoved: [], poolsOpened: 1, poolsKept: names.length + 2 });
      expect(await sendWithNodemailer(proxy.port, { subject: 'newbie-1' }, { user: user3.email, pass: user3.password })).toMatchObject({ ok: true, code: 250 });
      expect(n.received.map((r) => subjectOf(r.raw))).toEqual(['newbie-1']);

      stopping = true;
      await Promise.all(streams);

      // Every message: 250.
      const failed = results.filter((r) => !r.ok || r.code !== 250);
      expect(failed).toEqual([]);

      // Where each landed.
      const landed = new Map<string, string>();
      for (const [name, server] of Object.entries(ds)) for (const r of server.received) landed.set(subjectOf(r.raw), name);
      for (const r of p.received) landed.set(r.subject, 'p');
      for (const r of u.received) landed.set(subjectOf(r.raw), 'u');
      const user1Results = results.filter((r) => r.stream !== 's');
      expect(landed.size).toBe(results.length);

      // The broken version never served.
      expect(ds.d3.received).toHaveLength(0);

      // Each message went where the version active at its start, or at its end, said.
      const versionAt = (t: number): number => timeline.reduce((found, entry, i) => (entry.time <= t ? i : found), 0);
      const misrouted = user1Results
        .map((r) => {
          const allowed = timeline.slice(versionAt(r.start - 1), versionAt(r.end) + 1).map((e) => e.target);
          return { subject: r.subject, landed: landed.get(r.subject), allowed };
        })
        .filter((m) => !m.allowed.includes(m.landed!));
      expect(misrouted).toEqual([]);

      // Monotonic: a message that started after another ended never used an older version.
      const version = (r: Result): number => rank.indexOf(landed.get(r.subject)!);
      const regressions: string[] = [];
      for (const a of user1Results) for (const b of user1Results) if (b.start > a.end && version(b) < version(a)) regressions.push(`${b.subject}@${landed.get(b.subject)} after ${a.subject}@${landed.get(a.subject)}`);
      expect(regressions).toEqual([]);

      // While the selector was deleted, the last good version (d4) served.
      const whileDeleted = user1Results.filter((r) => r.start > deletedAt && r.end < returnedAt);
      expect(whileDeleted.length).toBeGreaterThanOrEqual(3);
      expect(new Set(whileDeleted.map((r) => landed.get(r.subject)))).toEqual(new Set(['d4']));

      // Every version in turn served something.
      expect(new Set(user1Results.map((r) => landed.get(r.subject)))).toEqual(new Set(rank));

      // After the old password stopped working, the relay saw only the new one, and no failed logins.
      const afterRotation = p.received.filter((r) => r.at > restrictedAt);
      expect(afterRotation.length).toBeGreaterThanOrEqual(3);
      expect(new Set(afterRotation.map((r) => r.pass))).toEqual(new Set(['new-secret']));
      expect(p.authFailures()).toBe(0);

      // user2's stream ran across the reloads on the one connection it opened at the start.
      const steady = results.filter((r) => r.stream === 's');
      expect(steady.length).toBeGreaterThanOrEqual(15);
      expect(steady.some((r) => r.start > returnedAt)).toBe(true);
      expect(u.received).toHaveLength(steady.length);
      expect(u.connections()).toBe(1);

      // One reload line per change; the failures said so, and nothing else reloaded.
      const outcomes = logs.filter(isReloadOutcome).map((l) => (isReloaded(l) ? 'reloaded' : 'failed'));
      expect(outcomes).toEqual(['reloaded', 'reloaded', 'failed', 'reloaded', 'failed', 'reloaded', 'reloaded', 'reloaded', 'reloaded', 'reloaded']);
    } finally {
      stopping = true;
      await Promise.all(streams);
    }
  }, 120_000);
});

describe('reload details', () => {
  test('the reload line says what changed and how long it took, and an unchanged downstream keeps its open connection', async () => {
    const [x, y, z, w] = [await downstream(), await downstream(), await downstream(), await downstream()];
    const dir = tempDir();
    const a: UserSpec = { email: 'a@user.com', password: 'pa', selector: 'sa.js', downstreams: [{ name: 'x', addr: x.addr }, { name: 'y', addr: y.addr }] };
    const b: UserSpec = { email: 'b@user.com', password: 'pb', selector: 'sb.js', downstreams: [{ name: 'z', addr: z.addr }] };
    writeIn(dir, 'sa.js', fixedSelector('x', 'a v1'));
    writeIn(dir, 'sb.js', `// the user's last downstream\nfunction select(message, downstreams) {\n  return [downstreams[downstreams.length - 1].name];\n}\n`);
    writeIn(dir, 'config.yaml', yamlConfig([a, b]));
    const proxy = await watched(dir);
    expect(await sendWithNodemailer(proxy.port, { subject: 'before' }, { user: a.email, pass: a.password })).toMatchObject({ ok: true });
    expect(await sendWithNodemailer(proxy.port, { subject: 'b' }, { user: b.email, pass: b.password })).toMatchObject({ ok: true });
    expect(x.connections()).toBe(1);

    // a loses y and gets a new selector; b is removed; c arrives, sharing x and adding w.
    const c: UserSpec = { email: 'c@user.com', password: 'pc', selector: 'sb.js', downstreams: [{ name: 'x', addr: x.addr }, { name: 'w', addr: w.addr }] };
    const from = proxy.logs.length;
    writeFileSync(path.join(dir, 'sa.js'), fixedSelector('x', 'a v2'));
    renameOver(path.join(dir, 'config.yaml'), yamlConfig([{ ...a, downstreams: [a.downstreams[0]] }, c]));
    const { line } = await waitForLog(proxy.logs, from, isReloadOutcome, 'the reload');
    expect(line).toMatchObject({
      msg: 'reloaded',
      reason: 'file changed',
      usersAdded: ['c@user.com'],
      usersRemoved: ['b@user.com'],
      usersChanged: ['a@user.com'],
      poolsOpened: 1,
      poolsKept: 1,
      poolsClosed: 2,
      selectorsCompiled: [path.join(dir, 'sa.js'), path.join(dir, 'sb.js')],
      selectorsKept: 0,
      needsRestart: [],
    });
    expect(line.ms).toEqual(expect.any(Number));
    expect(line.ms as number).toBeLessThan(5000);

    expect(await sendWithNodemailer(proxy.port, { subject: 'after' }, { user: a.email, pass: a.password })).toMatchObject({ ok: true });
    expect(x.received.map((r) => subjectOf(r.raw))).toEqual(['before', 'after']);
    expect(x.connections()).toBe(1);
    // b is gone.
    expect(await sendWithNodemailer(proxy.port, { subject: 'b again' }, { user: b.email, pass: b.password })).toMatchObject({ ok: false, code: 535 });
    expect(await sendWithNodemailer(proxy.port, { subject: 'c' }, { user: c.email, pass: c.password })).toMatchObject({ ok: true });
    expect(w.received.map((r) => subjectOf(r.raw))).toEqual(['c']);
    expect(z.received.map((r) => subjectOf(r.raw))).toEqual(['b']);
  });

  test('saving the same content again, or a burst of writes, reloads once at most', async () => {
    const [x, y] = [await downstream(), await downstream()];
    const dir = tempDir();
    const sel = writeIn(dir, 'sel.js', fixedSelector('x'));
    writeIn(dir, 'config.yaml', yamlConfig([{ email: USER1.user, password: USER1.pass, selector: 'sel.js', downstreams: [{ name: 'x', addr: x.addr }, { name: 'y', addr: y.addr }] }]));
    // Events only (the poll is far away), so what is counted is the debounce.
    const proxy = await watched(dir, { watch: { debounceMs: 150, pollMs: 600_000 } });

    writeFileSync(sel, fixedSelector('x'));
    renameOver(sel, fixedSelector('x'));
    expect(await proxy.nextCheck()).toBe('unchanged');
    expect(proxy.logs.filter(isReloadOutcome)).toHaveLength(0);

    for (let i = 0; i < 5; i++) {
      writeFileSync(sel, fixedSelector(i === 4 ? 'y' : 'x', `burst ${i}`));
      await sleep(20);
    }
    await waitForLog(proxy.logs, 0, isReloaded, 'the reload after the burst');
    // Once the look that reloaded is over, one more look finds nothing new: the burst was one reload.
    await until(() => proxy.checks.includes('changed'), 'the reloading look to end');
    expect(await proxy.nextCheck()).toBe('unchanged');
    expect(proxy.logs.filter(isReloadOutcome)).toHaveLength(1);
    expect(await sendWithNodemailer(proxy.port, { subject: 'after burst' })).toMatchObject({ ok: true });
    expect(y.received.map((r) => subjectOf(r.raw))).toEqual(['after burst']);
  });

  test('a save that lands while a reload which changes the watched files is running is not lost', async () => {
    const [x, y, z] = [await downstream(), await downstream(), await downstream()];
    const dir = tempDir();
    const a: UserSpec = { email: USER1.user, password: USER1.pass, selector: 'sa.js', downstreams: [{ name: 'x', addr: x.addr }, { name: 'y', addr: y.addr }] };
    const b: UserSpec = { email: 'b@user.com', password: 'pb', selector: 'sb.js', downstreams: [{ name: 'z', addr: z.addr }] };
    const sa = writeIn(dir, 'sa.js', fixedSelector('x'));
    writeIn(dir, 'sb.js', fixedSelector('z'));
    writeIn(dir, 'config.yaml', yamlConfig([a]));
    // The moment the first reload is logged (its files read, the watcher not yet told), sa.js is saved again.
    let saved = false;
    const proxy = await watched(dir, {
      // Events only: a poll would eventually look, but not at a fingerprint it was told is current.
      watch: { debounceMs: 100, pollMs: 600_000 },
      onLog: (line) => {
        if (isReloaded(line) && !saved) {
          saved = true;
          renameOver(sa, fixedSelector('y', 'saved during the reload'));
        }
      },
    });
    renameOver(path.join(dir, 'config.yaml'), yamlConfig([a, b]));
    await waitForLog(proxy.logs, 0, isReloaded, 'the reload that adds sb.js');
    await waitForLog(proxy.logs, proxy.logs.findIndex(isReloaded) + 1, isReloaded, 'a reload that picks up the save of sa.js', 5000);
    expect(await sendWithNodemailer(proxy.port, { subject: 'after' })).toMatchObject({ ok: true });
    expect(y.received.map((r) => subjectOf(r.raw))).toEqual(['after']);
  });

  test('a change of listen.port is logged as needing a restart, and the proxy keeps listening where it was', async () => {
    const x = await downstream();
    const dir = tempDir();
    const spec: UserSpec = { email: USER1.user, password: USER1.pass, selector: 'sel.js', downstreams: [{ name: 'x', addr: x.addr }] };
    writeIn(dir, 'sel.js', fixedSelector('x'));
    writeIn(dir, 'config.yaml', yamlConfig([spec], { listen: { port: 0 } }));
    const proxy = await watched(dir);
    const from = proxy.logs.length;
    renameOver(path.join(dir, 'config.yaml'), yamlConfig([spec], { listen: { port: 2999 } }));
    const { line } = await waitForLog(proxy.logs, from, isReloadOutcome, 'the reload');
    expect(line).toMatchObject({ msg: 'reloaded', needsRestart: ['listen (127.0.0.1:0 → 127.0.0.1:2999)'] });
    const warning = proxy.logs.slice(from).find((l) => /only after a restart/.test(String(l.msg)));
    expect(warning).toMatchObject({ level: 40, settings: ['listen (127.0.0.1:0 → 127.0.0.1:2999)'] });
    expect(proxy.app.port).toBe(proxy.port);
    expect(await sendWithNodemailer(proxy.port, { subject: 'still here' })).toMatchObject({ ok: true, code: 250 });
  });

  test('a failed reload changes nothing and its log names the file, line and column (selector) or file:key (config); the next good save recovers', async () => {
    const [good, other] = [await downstream(), await downstream()];
    const dir = tempDir();
    const spec: UserSpec = { email: USER1.user, password: USER1.pass, selector: 'sel.js', downstreams: [{ name: 'good', addr: good.addr }, { name: 'other', addr: other.addr }] };
    const sel = writeIn(dir, 'sel.js', fixedSelector('good'));
    const configFile = writeIn(dir, 'config.yaml', yamlConfig([spec]));
    const proxy = await watched(dir);
    const newcomer: UserSpec = { email: 'newcomer@user.com', password: 'pn', selector: 'sel.js', downstreams: [{ name: 'good', addr: good.addr }] };

    const breakages: { name: string; apply: () => void; expectProblem: RegExp }[] = [
      {
        name: 'selector syntax error',
        apply: () => renameOver(sel, `function select() {\n  return ['other'];\n}\nselect(;\n`),
        expectProblem: new RegExp(`${escape(sel)}:4:8: SyntaxError: `),
      },
      {
        name: 'selector that throws at load',
        apply: () => renameOver(sel, `function select() { return ['other']; }\nconst table = {};\nconst n = table.missing.length;\n`),
        expectProblem: new RegExp(`${escape(sel)}:3:25: TypeError: .*length`),
      },
      {
        name: 'config schema error',
        apply: () => renameOver(configFile, yamlConfig([spec, newcomer], { limits: { ...SETTINGS.limits, selector_timeout_ms: 'soon' } })),
        expectProblem: /config\.yaml:limits\.selector_timeout_ms: .*\(line 6\)/,
      },
      {
        name: 'config YAML error',
        apply: () => renameOver(configFile, `${yamlConfig([spec, newcomer])}  - email: [unclosed\n`),
        expectProblem: /config\.yaml:\d+:\d+: YAML: /,
      },
    ];
    let n = 0;
    for (const breakage of breakages) {
      const from = proxy.logs.length;
      breakage.apply();
      const { line } = await waitForLog(proxy.logs, from, isReloadOutcome, breakage.name);
      expect({ name: breakage.name, msg: line.msg, level: line.level }).toEqual({ name: breakage.name, msg: 'reload failed; the last good config keeps serving', level: 50 });
      expect({ name: breakage.name, problems: (line.problems as string[]).join('\n') }).toEqual({ name: breakage.name, problems: expect.stringMatching(breakage.expectProblem) });
      // Nothing changed: the old selector routes, the would-be new user cannot log in.
      expect(await sendWithNodemailer(proxy.port, { subject: `broken ${++n}` })).toMatchObject({ ok: true, code: 250 });
      expect(await sendWithNodemailer(proxy.port, { subject: 'newcomer' }, { user: newcomer.email, pass: newcomer.password })).toMatchObject({ ok: false, code: 535 });
      // A good save recovers by itself.
      const fixFrom = proxy.logs.length;
      renameOver(sel, fixedSelector('good', `fixed ${n}`));
      renameOver(configFile, yamlConfig([spec]));
      const fixed = await waitForLog(proxy.logs, fixFrom, isReloadOutcome, `the fix after ${breakage.name}`);
      expect({ name: breakage.name, msg: fixed.line.msg }).toEqual({ name: breakage.name, msg: 'reloaded' });
      expect(await sendWithNodemailer(proxy.port, { subject: `fixed ${n}` })).toMatchObject({ ok: true, code: 250 });
    }
    expect(other.received).toHaveLength(0);
    expect(good.received).toHaveLength(2 * breakages.length);
  });

  test('a deleted selector whose name is also a bundled one keeps the last good version (it does not fall back to the bundled file)', async () => {
    const [primary, backup] = [await downstream(), await downstream()];
    const dir = tempDir();
    // The user's own waterfall.js beside the config, which prefers backup; the bundled one would pick primary.
    const own = writeIn(dir, 'waterfall.js', fixedSelector('backup', 'my own waterfall'));
    writeIn(dir, 'config.yaml', yamlConfig([{ email: USER1.user, password: USER1.pass, selector: 'waterfall.js', downstreams: [{ name: 'primary', addr: primary.addr }, { name: 'backup', addr: backup.addr }] }]));
    const proxy = await watched(dir);
    expect(await sendWithNodemailer(proxy.port, { subject: 'own 1' })).toMatchObject({ ok: true });
    const from = proxy.logs.length;
    unlinkSync(own);
    const { line } = await waitForLog(proxy.logs, from, isReloadOutcome, 'the reload after the deletion');
    expect({ msg: line.msg, level: line.level }).toEqual({ msg: 'reload failed; the last good config keeps serving', level: 40 });
    expect(await sendWithNodemailer(proxy.port, { subject: 'own 2' })).toMatchObject({ ok: true });
    expect(backup.received.map((r) => subjectOf(r.raw))).toEqual(['own 1', 'own 2']);
    expect(primary.received).toHaveLength(0);
  });
});

describe('messages inside a selector during a reload', () => {
  // v1 drives send(): first to a slow server that answers 451 when the test releases it, then falls over to fast1.
  const V1 = `async function select(message) {
  if (!message.subject.startsWith('slow')) return ['fast1'];
  try {
    await send('slow');
  } catch (err) {
    log('v1 falling over after ' + err.responseCode);
    await send('fast1');
  }
}
`;
  const V2 = `function select(message) {\n  log('v2 ran');\n  return ['fast2'];\n}\n`;

  async function setup(): Promise<{ proxy: WatchedProxy; dir: string; fast1: Downstream; fast2: Downstream; slow: Awaited<ReturnType<typeof startSlowDownstream>>; spec: UserSpec }> {
    const [fast1, fast2] = [await downstream(), await downstream()];
    const slow = track(await startSlowDownstream(Infinity, 451));
    const dir = tempDir();
    const spec: UserSpec = {
      email: USER1.user,
      password: USER1.pass,
      selector: 'sel.js',
      downstreams: [
        { name: 'slow', addr: slow.addr },
        { name: 'fast1', addr: fast1.addr },
        { name: 'fast2', addr: fast2.addr },
      ],
    };
    writeIn(dir, 'sel.js', V1);
    writeIn(dir, 'config.yaml', yamlConfig([spec]));
    const proxy = await watched(dir);
    return { proxy, dir, fast1, fast2, slow, spec };
  }

  /** Starts the slow message and resolves once it is inside v1, awaiting the slow server (wrapped: an async function would flatten the promise). */
  async function startSlow(proxy: WatchedProxy, slow: { seen: string[] }): Promise<{ sending: Promise<Sent> }> {
    const sending = sendWithNodemailer(proxy.port, { subject: 'slow-1' });
    await until(() => slow.seen.includes('slow-1'), 'the slow message reaching the slow server');
    return { sending };
  }

  /** Reload 1 of two: adds a second user, other@user.com, routed to fast2, and waits for the reload. */
  async function reloadAddingOther(proxy: WatchedProxy, dir: string, spec: UserSpec, fast2: Downstream): Promise<{ other: UserSpec; line: LogLine }> {
    const from = proxy.logs.length;
    const other: UserSpec = { email: 'other@user.com', password: 'po', selector: 'round-robin.js', downstreams: [{ name: 'fast2', addr: fast2.addr }] };
    renameOver(path.join(dir, 'config.yaml'), yamlConfig([spec, other]));
    const { line } = await waitForLog(proxy.logs, from, isReloaded, 'reload 1');
    return { other, line };
  }

  function expectFinishedOnV1(proxy: WatchedProxy, sent: Sent, fast1: Downstream): void {
    expect(sent).toMatchObject({ ok: true, code: 250 });
    expect(sent.response).toMatch(/via fast1/);
    expect(fast1.received.map((r) => subjectOf(r.raw))).toEqual(['slow-1']);
    expect(proxy.logs.some((l) => l.msg === 'v1 falling over after 451')).toBe(true);
    const line = proxy.logs.find((l) => l.outcome !== undefined && (l.attempts as { downstream: string }[]).some((a) => a.downstream === 'slow'));
    expect(line).toMatchObject({ outcome: 'delivered', downstream: 'fast1', selectorResult: { kind: 'none' } });
  }

  test('a message inside a slow selector when the selector is replaced finishes on the old version; the next message uses the new one at once', async () => {
    const { proxy, dir, fast1, fast2, slow } = await setup();
    const { sending } = await startSlow(proxy, slow);
    const from = proxy.logs.length;
    renameOver(path.join(dir, 'sel.js'), V2);
    await waitForLog(proxy.logs, from, isReloaded, 'the reload to v2');
    // The next message does not queue behind the slow one: it runs in v2's own isolate, and is
    // delivered while the slow message is still inside v1 (nothing has reached fast1 yet).
    expect(await sendWithNodemailer(proxy.port, { subject: 'next' })).toMatchObject({ ok: true, code: 250 });
    expect(fast2.received.map((r) => subjectOf(r.raw))).toEqual(['next']);
    expect(fast1.received).toHaveLength(0);
    slow.release();
    expectFinishedOnV1(proxy, await sending, fast1);
  });

  test('a message inside a slow selector finishes on the old version even when two reloads happen while it runs (a carried-over isolate then replaced)', async () => {
    const { proxy, dir, fast1, fast2, slow, spec } = await setup();
    const { sending } = await startSlow(proxy, slow);
    // Reload 1 changes only the config (a new user): the running isolate is carried over.
    const first = await reloadAddingOther(proxy, dir, spec, fast2);
    expect(first.line).toMatchObject({ usersAdded: ['other@user.com'], selectorsCompiled: [expect.stringContaining('round-robin.js')], selectorsKept: 1 });
    // Reload 2 replaces the selector: the isolate the slow message is inside is no longer wanted.
    const from = proxy.logs.length;
    renameOver(path.join(dir, 'sel.js'), V2);
    await waitForLog(proxy.logs, from, isReloaded, 'reload 2');
    expect(await sendWithNodemailer(proxy.port, { subject: 'next' })).toMatchObject({ ok: true, code: 250 });
    expect(fast2.received.map((r) => subjectOf(r.raw))).toEqual(['next']);
    expect(fast1.received).toHaveLength(0); // the slow message is still inside v1
    slow.release();
    expectFinishedOnV1(proxy, await sending, fast1);
  });

  test('a message in flight keeps the pools of its version even when two reloads happen while it runs (a carried-over pool then removed)', async () => {
    const { proxy, dir, fast1, fast2, slow, spec } = await setup();
    const { sending } = await startSlow(proxy, slow);
    // Reload 1 adds a user (fast1's pool is carried over); reload 2 removes fast1 from the config.
    const { other } = await reloadAddingOther(proxy, dir, spec, fast2);
    const from = proxy.logs.length;
    renameOver(path.join(dir, 'config.yaml'), yamlConfig([{ ...spec, downstreams: spec.downstreams.filter((d) => d.name !== 'fast1') }, other]));
    const second = await waitForLog(proxy.logs, from, isReloaded, 'reload 2');
    expect(second.line).toMatchObject({ poolsClosed: 1 });
    expect(fast1.received).toHaveLength(0); // the slow message is still inside v1
    slow.release();
    expectFinishedOnV1(proxy, await sending, fast1);
  });
});

function escape(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}
