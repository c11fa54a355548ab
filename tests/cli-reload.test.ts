// Reload as an operator sees it, with `smtpmux serve` as a separate process: SIGHUP reloads (as an MTA
// admin expects), a saved selector is picked up by the watcher and changes routing, a broken save keeps
// the last good version serving, and SIGTERM exits 0.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startDownstream, subjectOf, type Downstream } from './support/downstream';
import { sendWithNodemailer } from './support/clients';
import { envWithout, startServe, type ServeProcess } from './support/cli';
import { fixedSelector, renameOver } from './support/reload';
import { testConfig } from './support/config';

const running: ServeProcess[] = [];
const downstreams: Downstream[] = [];
let dir: string;

beforeEach(() => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'smtpmux-cli-reload-'));
});
afterEach(async () => {
  for (const p of running.splice(0)) await p.kill();
  for (const ds of downstreams.splice(0)) await ds.close();
  rmSync(dir, { recursive: true, force: true });
});

async function downstream(): Promise<Downstream> {
  const ds = await startDownstream();
  downstreams.push(ds);
  return ds;
}

function config(users: { email: string; password: string; selector: string; downstreams: { name: string; addr: string }[] }[]): string {
  return testConfig({
    limits: { selector_timeout_ms: 2000, selector_memory_mb: 32 },
    delivery: { connect_timeout_ms: 2000, socket_timeout_ms: 10000 },
    users,
  });
}

/** The JSON log lines the process printed so far. */
function logLines(p: ServeProcess): Record<string, unknown>[] {
  return p
    .stdout()
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

/** Waits (bounded) until the process has printed more than `count` lines matching `match`; returns the newest. */
async function nextLine(p: ServeProcess, match: (l: Record<string, unknown>) => boolean, count: number, what: string, timeoutMs = 10_000): Promise<Record<string, unknown>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const found = logLines(p).filter(match);
    if (found.length > count) return found[found.length - 1];
    if (Date.now() > deadline) throw new Error(`no new ${what} within ${timeoutMs} ms:\n${p.stdout()}\n${p.stderr()}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

const reloaded = (l: Record<string, unknown>): boolean => l.msg === 'reloaded';
const failed = (l: Record<string, unknown>): boolean => String(l.msg).startsWith('reload failed');
const env = (): NodeJS.ProcessEnv => envWithout('SMTPMUX_CONFIG', 'SMTPMUX_PORT', 'SMTPMUX_HOST', 'SMTPMUX_LOG_LEVEL');

describe('smtpmux serve reloads', () => {
  test('SIGHUP reloads the config: a user added to the file can log in, and the reload line says reason SIGHUP', async () => {
    const a = await downstream();
    const first = { email: 'test@user.com', password: 'password123', selector: 'sel.js', downstreams: [{ name: 'a', addr: a.addr }] };
    const second = { email: 'hup@user.com', password: 'hup-pw', selector: 'sel.js', downstreams: [{ name: 'a', addr: a.addr }] };
    writeFileSync(path.join(dir, 'sel.js'), fixedSelector('a'));
    const file = path.join(dir, 'config.yaml');
    writeFileSync(file, config([first]));
    const p = await startServe(file, env());
    running.push(p);
    expect(p.port).toBeGreaterThan(0);

    // Nothing changed: SIGHUP still reloads, and says so.
    p.child.kill('SIGHUP');
    const quiet = await nextLine(p, reloaded, 0, "'reloaded' after SIGHUP");
    expect(quiet).toMatchObject({ reason: 'SIGHUP', usersAdded: [], usersRemoved: [], poolsOpened: 0, selectorsCompiled: [] });
    expect(quiet.ms).toEqual(expect.any(Number));

    // Edit and signal at once, before the watcher's debounce has run: the SIGHUP reload reads the edit.
    writeFileSync(file, config([first, second]));
    p.child.kill('SIGHUP');
    const hup = await nextLine(p, (l) => reloaded(l) && l.reason === 'SIGHUP', 1, "a second 'reloaded' with reason SIGHUP");
    expect(hup).toMatchObject({ reason: 'SIGHUP', usersAdded: ['hup@user.com'] });
    expect(await sendWithNodemailer(p.port, { subject: 'after hup' }, { user: second.email, pass: second.password })).toMatchObject({ ok: true, code: 250 });
    expect(a.received.map((r) => subjectOf(r.raw))).toEqual(['after hup']);
    // The process is still the one it was.
    expect(p.child.exitCode).toBeNull();
  });

  test('saving the selector hot-reloads it (no signal) and routing changes; a broken save keeps the last good one; SIGTERM exits 0', async () => {
    const [a, b, c] = [await downstream(), await downstream(), await downstream()];
    const sel = path.join(dir, 'sel.js');
    writeFileSync(sel, fixedSelector('a'));
    const file = path.join(dir, 'config.yaml');
    const user = { email: 'test@user.com', password: 'password123', selector: 'sel.js', downstreams: [{ name: 'a', addr: a.addr }, { name: 'b', addr: b.addr }, { name: 'c', addr: c.addr }] };
    writeFileSync(file, config([user]));
    const p = await startServe(file, env());
    running.push(p);
    expect(await sendWithNodemailer(p.port, { subject: 'one' })).toMatchObject({ ok: true, code: 250 });

    renameOver(sel, fixedSelector('b', 'saved by an editor'));
    const line = await nextLine(p, reloaded, 0, "'reloaded' from the watcher");
    expect(line).toMatchObject({ reason: 'file changed', selectorsCompiled: [sel] });
    expect(await sendWithNodemailer(p.port, { subject: 'two' })).toMatchObject({ ok: true, code: 250 });

    // A syntax error (that would have routed to c) is refused; b keeps serving.
    renameOver(sel, `const target = 'c';\nfunction select() { return [target]; }\nselect(;\n`);
    const bad = await nextLine(p, failed, 0, "'reload failed' from the watcher");
    expect((bad.problems as string[]).join('\n')).toContain(`${sel}:3:8: SyntaxError`);
    expect(await sendWithNodemailer(p.port, { subject: 'three' })).toMatchObject({ ok: true, code: 250 });

    expect(a.received.map((r) => subjectOf(r.raw))).toEqual(['one']);
    expect(b.received.map((r) => subjectOf(r.raw))).toEqual(['two', 'three']);
    expect(c.received).toHaveLength(0);

    p.child.kill('SIGTERM');
    expect(await p.exited).toBe(0);
    expect(logLines(p).some((l) => l.msg === 'stopped')).toBe(true);
  });
});
