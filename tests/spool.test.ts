// Store and forward over real loopback SMTP: a queueing user's message that no downstream takes is
// kept (250 Queued as <id>), retried through the current selector, delivered when a downstream is back,
// buried in the dead letter after max_age or a permanent refusal, and a full spool answers 452. The
// `smtpmux queue` commands run as their own process against the running proxy's spool.
import { startDownstream, subjectOf, type Downstream } from './support/downstream';
import { configFor, startProxy, TEST_LIMITS, type RunningProxy } from './support/proxy';
import { sendWithNodemailer } from './support/clients';
import { runCli } from './support/cli';
import path from 'node:path';

const open: { close(): Promise<void> }[] = [];
afterEach(async () => {
  for (const item of open.splice(0).reverse()) await item.close();
});

const TEMPFAIL = { kind: 'reply', code: 451, message: '4.3.0 Try again later' } as const;

async function downstream(options: Parameters<typeof startDownstream>[0] = {}): Promise<Downstream> {
  const ds = await startDownstream(options);
  open.push(ds);
  return ds;
}

/** A config with a spool polled every 50 ms and a user whose messages queue with short retries. */
function spoolConfig(options: { downstreams: { name: string; addr: string }[]; selector?: string; queue?: string; spool?: string }): string {
  const base = configFor({
    selector: options.selector ?? 'waterfall.js',
    extra: `${TEST_LIMITS}spool:\n  poll_interval: 50ms\n${options.spool ?? ''}`,
    downstreams: options.downstreams,
  });
  return `${base}    queue:\n${options.queue ?? '      first_retry: 100ms\n      max_retry: 400ms\n      max_age: 1h\n'}`;
}

async function proxy(config: string, files: Record<string, string> = {}): Promise<RunningProxy> {
  const p = await startProxy({ 'config.yaml': config, ...files });
  open.push({ close: () => p.stop() });
  return p;
}

/** Waits (bounded) until `check` holds. */
async function until(check: () => boolean, what: string, ms = 15_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const queuedId = (response: string): string => /Queued as (\S+)/.exec(response)?.[1] ?? '';
const queue = (p: RunningProxy, ...args: string[]) => runCli(['queue', ...args, '--config', path.join(p.dir, 'config.yaml')]);

describe('store and forward', () => {
  test('downstreams down: the client gets 250 Queued, and the message is delivered once the downstream is back', async () => {
    const ds = await downstream({ fail: TEMPFAIL });
    const p = await proxy(spoolConfig({ downstreams: [{ name: 'a', addr: ds.addr }] }));
    const sent = await sendWithNodemailer(p.port, { subject: 'keep me' });
    expect(sent).toMatchObject({ ok: true });
    expect(sent.response).toMatch(/^250 2\.0\.0 Queued as \S+/);
    const id = queuedId(sent.response);
    expect(p.app.spool!.stats()).toMatchObject({ queued: 1, dead: 0 });

    const listed = await queue(p, 'list');
    expect(listed.code).toBe(0);
    expect(listed.stdout).toContain(id);
    const shown = await queue(p, 'show', id);
    expect(shown.stdout).toMatch(/from: +app@example\.com/);
    expect(shown.stdout).toMatch(/to: +someone@example\.org/);
    expect(shown.stdout).toContain('Subject: keep me');
    expect(shown.stdout).not.toContain('hello there'); // the body only with --body
    expect((await queue(p, 'show', id, '--body')).stdout).toContain('hello there');

    ds.fail({ kind: 'none' });
    await until(() => ds.received.length === 1, 'the queued message to be delivered');
    expect(subjectOf(ds.received[0].raw)).toBe('keep me');
    await until(() => p.app.spool!.stats().queued === 0, 'the spool to empty');
    expect(p.logs.some((l) => l.msg === 'queued message delivered' && l.msgId === id)).toBe(true);
    expect(p.app.spool!.counters).toMatchObject({ queued: 1, delivered: 1, dead: 0 });
  });

  test('a permanent refusal by every downstream is still a 5xx and nothing is queued', async () => {
    const ds = await downstream({ fail: { kind: 'reply', code: 550, message: '5.1.1 No such user' } });
    const p = await proxy(spoolConfig({ downstreams: [{ name: 'a', addr: ds.addr }] }));
    expect(await sendWithNodemailer(p.port, {})).toMatchObject({ ok: false, code: 550 });
    expect(p.app.spool!.stats()).toMatchObject({ queued: 0, dead: 0 });
  });

  test('a user without queue keeps answering 451 when nothing accepted', async () => {
    const ds = await downstream({ fail: TEMPFAIL });
    const config = configFor({ selector: 'waterfall.js', extra: `${TEST_LIMITS}spool:\n  poll_interval: 50ms\n`, downstreams: [{ name: 'a', addr: ds.addr }] });
    const p = await proxy(config);
    expect(await sendWithNodemailer(p.port, {})).toMatchObject({ ok: false, code: 451 });
    expect(p.app.spool!.stats().queued).toBe(0);
  });

  test('max_age moves a message to the dead letter; the CLI lists it, retries it and drops it', async () => {
    const ds = await downstream({ fail: TEMPFAIL });
    const p = await proxy(spoolConfig({ downstreams: [{ name: 'a', addr: ds.addr }], queue: '      first_retry: 100ms\n      max_retry: 200ms\n      max_age: 600ms\n' }));
    const sent = await sendWithNodemailer(p.port, { subject: 'too old' });
    const id = queuedId(sent.response);
    expect(id).not.toBe('');
    await until(() => p.app.spool!.stats().dead === 1, 'the message to reach the dead letter');
    const buried = p.logs.find((l) => l.msg === 'queued message moved to the dead letter');
    expect(buried).toMatchObject({ msgId: id, reason: 'max_age reached' });
    expect(p.app.spool!.counters.dead).toBe(1);

    const dead = await queue(p, 'list', '--dead');
    expect(dead.stdout).toContain(id);
    expect(dead.stdout).toContain('max_age reached');
    expect((await queue(p, 'list')).stdout).not.toContain(id);

    // Out of the dead letter: the running server picks the retry up at its next poll.
    ds.fail({ kind: 'none' });
    const retried = await queue(p, 'retry', id);
    expect(retried).toMatchObject({ code: 0 });
    await until(() => ds.received.length === 1, 'the retried message to be delivered');
    expect(p.app.spool!.stats()).toMatchObject({ queued: 0, dead: 0 });
    expect((await queue(p, 'drop', id)).code).toBe(1); // gone already
  });

  test('a permanent refusal on a retry moves the message to the dead letter; drop removes it', async () => {
    const ds = await downstream({ fail: TEMPFAIL });
    const p = await proxy(spoolConfig({ downstreams: [{ name: 'a', addr: ds.addr }] }));
    const id = queuedId((await sendWithNodemailer(p.port, {})).response);
    ds.fail({ kind: 'reply', code: 550, message: '5.1.1 No such user' });
    await until(() => p.app.spool!.stats().dead === 1, 'the message to reach the dead letter');
    expect(p.logs.find((l) => l.msg === 'queued message moved to the dead letter')).toMatchObject({ msgId: id, reason: 'refused permanently' });
    expect((await queue(p, 'show', id)).stdout).toMatch(/state: +dead \(refused permanently/);
    expect(await queue(p, 'drop', id)).toMatchObject({ code: 0 });
    expect(p.app.spool!.stats()).toMatchObject({ queued: 0, dead: 0, bytes: 0 });
  });

  test('a full spool answers 452 4.3.1 and loses nothing: the queued ones are delivered, the refused one is the client\'s to resend', async () => {
    const ds = await downstream({ fail: TEMPFAIL });
    const p = await proxy(spoolConfig({ downstreams: [{ name: 'a', addr: ds.addr }], spool: '  max_size: 1KB\n' }));
    const text = 'x'.repeat(300);
    const first = await sendWithNodemailer(p.port, { subject: 'one', text });
    expect(first.response).toMatch(/Queued as/);
    const second = await sendWithNodemailer(p.port, { subject: 'two', text });
    expect(second).toMatchObject({ ok: false, code: 452 });
    expect(second.response).toMatch(/^452 4\.3\.1 The mail queue is full/);
    expect(p.app.spool!.stats().queued).toBe(1);

    ds.fail({ kind: 'none' });
    await until(() => ds.received.length === 1, 'the queued message to be delivered');
    expect(await sendWithNodemailer(p.port, { subject: 'two', text })).toMatchObject({ ok: true });
    expect(ds.received.map((r) => subjectOf(r.raw)).sort()).toEqual(['one', 'two']);
  });

  test('a retry runs the selector of the current config: after a reload, the new one', async () => {
    const a = await downstream({ fail: TEMPFAIL });
    const b = await downstream();
    const only = (name: string) => `function select(message, downstreams) { return ['${name}']; }\n`;
    const p = await proxy(spoolConfig({ selector: 'pick.js', downstreams: [{ name: 'a', addr: a.addr }, { name: 'b', addr: b.addr }] }), { 'pick.js': only('a') });
    expect((await sendWithNodemailer(p.port, {})).response).toMatch(/Queued as/);
    await until(() => p.logs.some((l) => l.msg === 'queued message not delivered yet; retrying later'), 'a failed retry');
    p.write('pick.js', only('b'));
    expect((await p.app.reload('test')).ok).toBe(true);
    await until(() => b.received.length === 1, 'delivery through the new selector');
    expect(a.received).toHaveLength(0);
  });
});
