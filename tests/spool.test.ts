// Store and forward over real loopback SMTP: a queueing user's message that no downstream takes is
// kept (250 Queued as <id>), retried through the current selector, delivered when a downstream is back,
// buried in the dead letter after max_age or a permanent refusal, and a full spool answers 452. The
// `smtpmux queue` commands run as their own process against the running proxy's spool.
import { startDownstream, subjectOf, type Downstream } from './support/downstream';
import { startProxy, type RunningProxy } from './support/proxy';
import { testConfig, TEST_LIMITS } from './support/config';
import { sendWithNodemailer } from './support/clients';
import { runCli } from './support/cli';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { retryDelay } from '../src/spool/schedule';
import { SpoolStore } from '../src/spool/store';
import { ConfigError, parseConfig } from '../src/config/load';
import { simpleParser } from 'mailparser';
import { renderStatus } from '../src/http/status';

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
function spoolConfig(options: { downstreams: { name: string; addr: string }[]; selector?: string; queue?: Record<string, string | boolean>; spool?: Record<string, string> }): string {
  return testConfig({
    ...TEST_LIMITS,
    spool: { poll_interval: '50ms', ...options.spool },
    users: [
      {
        selector: options.selector ?? 'waterfall.js',
        downstreams: options.downstreams,
        queue: options.queue ?? { first_retry: '100ms', max_retry: '400ms', max_age: '1h' },
      },
    ],
  });
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
    const scraped = await p.app.metrics.exposition();
    expect(scraped).toContain('smtpmux_messages_total{user="test@user.com",outcome="queued"} 1');
    expect(scraped).toContain('smtpmux_spool_messages{state="queued"} 1');
    expect(scraped).toMatch(/^smtpmux_spool_bytes [1-9]\d*$/m);
    expect(scraped).toContain('smtpmux_spool_events_total{event="queued"} 1');
    const page = renderStatus(await p.app.status());
    expect(page).toMatch(/Spool: <span class="pill warn">1 queued \(oldest \d+ s\)<\/span>, 0 in the dead letter/);
    expect(page).toContain('<span class="pill warn">1 queued</span>');

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
    await until(() => p.logs.some((l) => l.msg === 'queued message delivered' && l.msgId === id), 'the delivery to be logged');
    expect(p.app.spool!.stats().queued).toBe(0);
    expect(p.app.spool!.counters).toMatchObject({ queued: 1, delivered: 1, dead: 0 });
    expect(await p.app.metrics.exposition()).toContain('smtpmux_spool_events_total{event="delivered"} 1');
  });

  test('when every downstream is cooling down, the message is queued too (not answered 451)', async () => {
    // 421: the downstream itself is the problem for now, a back-off signal that starts its cooldown.
    const ds = await downstream({ fail: { kind: 'reply', code: 421, message: '4.7.0 Too busy, come back later' } });
    const p = await proxy(
      testConfig({
        ...TEST_LIMITS,
        spool: { poll_interval: '50ms' },
        users: [{ selector: 'waterfall.js', downstreams: [{ name: 'a', addr: ds.addr, cooldown: '1h' }], queue: { first_retry: '1h', max_retry: '1h' } }],
      }),
    );
    expect((await sendWithNodemailer(p.port, { subject: 'one' })).response).toMatch(/Queued as/);
    const second = await sendWithNodemailer(p.port, { subject: 'two' });
    expect(second.response).toMatch(/Queued as/);
    const id = queuedId(second.response);
    expect(p.logs.find((l) => l.msgId === id && l.outcome === 'deferred')).toMatchObject({ code: 'SMTPMUX_DOWNSTREAMS_LIMITED' });
    expect(p.app.spool!.stats().queued).toBe(2);
  });

  test('a permanent refusal by every downstream is still a 5xx and nothing is queued', async () => {
    const ds = await downstream({ fail: { kind: 'reply', code: 550, message: '5.1.1 No such user' } });
    const p = await proxy(spoolConfig({ downstreams: [{ name: 'a', addr: ds.addr }] }));
    expect(await sendWithNodemailer(p.port, {})).toMatchObject({ ok: false, code: 550 });
    expect(p.app.spool!.stats()).toMatchObject({ queued: 0, dead: 0 });
  });

  test('a user without queue keeps answering 451 when nothing accepted', async () => {
    const ds = await downstream({ fail: TEMPFAIL });
    const config = testConfig({ ...TEST_LIMITS, spool: { poll_interval: '50ms' }, selector: 'waterfall.js', downstreams: [{ name: 'a', addr: ds.addr }] });
    const p = await proxy(config);
    expect(await sendWithNodemailer(p.port, {})).toMatchObject({ ok: false, code: 451 });
    expect(p.app.spool!.stats().queued).toBe(0);
  });

  test('max_age moves a message to the dead letter; the CLI lists it, retries it and drops it', async () => {
    const ds = await downstream({ fail: TEMPFAIL });
    const p = await proxy(spoolConfig({ downstreams: [{ name: 'a', addr: ds.addr }], queue: { first_retry: '100ms', max_retry: '200ms', max_age: '600ms' } }));
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
    await until(() => p.app.spool!.stats().queued + p.app.spool!.stats().dead === 0, 'the spool to empty');
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

  test('with bounce: true, a dead message gets an RFC 3464 report to its envelope sender, from the null sender', async () => {
    // Refuses the original for now; accepts the bounce (which quotes the original's headers in its last part).
    const ds = await downstream({ decide: (raw) => (/^Subject: doomed/m.test(raw.toString().split('\r\n\r\n')[0]) ? TEMPFAIL : undefined) });
    const p = await proxy(spoolConfig({ downstreams: [{ name: 'a', addr: ds.addr }], queue: { first_retry: '100ms', max_retry: '200ms', max_age: '500ms', bounce: true } }));
    const id = queuedId((await sendWithNodemailer(p.port, { subject: 'doomed', to: ['x@example.org', 'y@example.org'] })).response);
    await until(() => ds.received.length === 1, 'the bounce to be delivered');
    const bounce = ds.received[0];
    expect(bounce.from).toBe('');
    expect(bounce.to).toEqual(['app@example.com']);
    const parsed = await simpleParser(bounce.raw);
    expect(parsed.headers.get('content-type')).toMatchObject({ value: 'multipart/report', params: { 'report-type': 'delivery-status' } });
    expect(parsed.subject).toBe('Undelivered Mail Returned to Sender');
    expect(parsed.headers.get('auto-submitted')).toBe('auto-replied');
    expect(parsed.text).toContain('"doomed" to x@example.org, y@example.org was not delivered');
    // The three parts of RFC 3464 in order (mailparser folds message/delivery-status into the text).
    const boundary = (parsed.headers.get('content-type') as { params: { boundary: string } }).params.boundary;
    const parts = bounce.raw.toString().split(`--${boundary}`).slice(1, -1);
    expect(parts.map((part) => /^\r\nContent-Type: ([^;\r]+)/.exec(part)?.[1])).toEqual(['text/plain', 'message/delivery-status', 'text/rfc822-headers']);
    expect(parts[1]).toMatch(/^Reporting-MTA: dns; \S+/m);
    expect(parts[1]).toContain('Final-Recipient: rfc822; x@example.org\r\nAction: failed\r\nStatus: 4.4.7');
    expect(parts[1]).toContain('Final-Recipient: rfc822; y@example.org');
    expect(parts[2]).toContain('Subject: doomed');
    expect(parts[2]).not.toContain('hello there'); // headers only, never the body
    expect(p.logs.find((l) => l.msg === 'bounce queued for the sender of a dead message')).toMatchObject({ bounceOf: id, status: '4.4.7' });
    expect(p.app.spool!.stats()).toMatchObject({ dead: 1 });
  });

  test('a full spool answers 452 4.3.1 and loses nothing: the queued ones are delivered, the refused one is the client\'s to resend', async () => {
    const ds = await downstream({ fail: TEMPFAIL });
    const p = await proxy(spoolConfig({ downstreams: [{ name: 'a', addr: ds.addr }], spool: { max_size: '1KB' } }));
    const text = 'x'.repeat(300);
    const first = await sendWithNodemailer(p.port, { subject: 'one', text });
    expect(first.response).toMatch(/Queued as/);
    const second = await sendWithNodemailer(p.port, { subject: 'two', text });
    expect(second).toMatchObject({ ok: false, code: 452 });
    expect(second.response).toMatch(/^452 4\.3\.1 The mail queue is full/);
    expect(p.app.spool!.stats().queued).toBe(1);

    ds.fail({ kind: 'none' });
    await until(() => ds.received.length === 1 && p.app.spool!.stats().bytes === 0, 'the queued message to be delivered');
    expect(await sendWithNodemailer(p.port, { subject: 'two', text })).toMatchObject({ ok: true });
    expect(ds.received.map((r) => subjectOf(r.raw)).sort()).toEqual(['one', 'two']);
  });

  test('a retry runs the selector of the current config (after a reload, the new one), told the attempt and when it was queued', async () => {
    const a = await downstream({ fail: TEMPFAIL });
    const b = await downstream();
    const only = (name: string) => `function select(message, downstreams) { log('attempt ' + message.attempt + ' queued ' + message.queuedAt); return ['${name}']; }\n`;
    const p = await proxy(spoolConfig({ selector: 'pick.js', downstreams: [{ name: 'a', addr: a.addr }, { name: 'b', addr: b.addr }] }), { 'pick.js': only('a') });
    expect((await sendWithNodemailer(p.port, {})).response).toMatch(/Queued as/);
    await until(() => p.logs.some((l) => l.msg === 'queued message not delivered yet; retrying later'), 'a failed retry');
    p.write('pick.js', only('b'));
    expect((await p.app.reload('test')).ok).toBe(true);
    await until(() => b.received.length === 1, 'delivery through the new selector');
    expect(a.received).toHaveLength(0);
    const told = p.logs.filter((l) => l.scriptLog).map((l) => String(l.msg).replace(/^\S+: /, ''));
    expect(told[0]).toBe('attempt 1 queued null');
    expect(told[1]).toMatch(/^attempt 2 queued \d{4}-\d\d-\d\dT[\d:.]+Z$/);
    expect(told[told.length - 1]).toMatch(new RegExp(`^attempt ${told.length} queued `));
  });
});

describe('the spool schedule', () => {
  test('back-off doubles from first_retry up to max_retry, each wait within ±20%', () => {
    const queue = { firstRetryMs: 1000, maxRetryMs: 10_000 };
    expect([1, 2, 3, 4, 5, 6].map((n) => retryDelay(n, queue, 0.5))).toEqual([1000, 2000, 4000, 8000, 10_000, 10_000]);
    expect(retryDelay(2, queue, 0)).toBe(1600);
    expect(retryDelay(2, queue, 0.999_999)).toBe(2400);
    expect(retryDelay(50, queue, 0.999_999)).toBe(10_000); // never past max_retry
  });

  test('after a downtime the longest overdue message is retried first; files without a row are removed at recovery', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'smtpmux-store-'));
    const store = await SpoolStore.open(dir, { serving: true });
    try {
      const entry = (id: string, nextAt: number) => ({
        id, user: 'u', envelope: { from: 'a@b', to: ['c@d'], use8BitMime: false }, size: 5, clientAddress: '127.0.0.1',
        headers: 'Subject: x', queuedAt: 1, expiresAt: 10_000, nextAt, attempts: 1, lastError: '451',
      });
      await store.add(entry('LATE', 300), Buffer.from('hello'));
      await store.add(entry('EARLIEST', 100), Buffer.from('hello'));
      await store.add(entry('FUTURE', 5000), Buffer.from('hello'));
      await store.add(entry('MIDDLE', 200), Buffer.from('hello'));
      expect(store.due(1000, 10).map((e) => e.id)).toEqual(['EARLIEST', 'MIDDLE', 'LATE']);
      expect(store.lease('EARLIEST', 1000)).toBe(true);
      expect(store.lease('EARLIEST', 1000)).toBe(false); // taken
      writeFileSync(path.join(dir, 'bodies', 'NEVERQUEUED.eml.tmp'), 'half');
      const recovery = await store.recover(2000);
      expect(recovery).toEqual({ interrupted: ['EARLIEST'], orphans: 1, missingBodies: [] });
      expect(existsSync(path.join(dir, 'bodies', 'NEVERQUEUED.eml.tmp'))).toBe(false);
      expect(store.stats()).toEqual({ queued: 4, dead: 0, bytes: 20, oldestQueuedAt: 1 });
      // One serving process per spool folder (recovery would pull files from under another); commands may share it.
      await expect(SpoolStore.open(dir, { serving: true })).rejects.toThrow(/another SMTP Mux process serves the spool in .*; each running instance needs its own spool.dir/);
      const command = await SpoolStore.open(dir, { serving: false });
      expect(command.list('queued')).toHaveLength(4);
      command.close();
    } finally {
      store.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('spool config', () => {
  const file = path.join(os.tmpdir(), 'conf', 'config.yaml');
  const parse = (spec: Record<string, unknown>, queue?: Record<string, string>) =>
    parseConfig(testConfig({ ...spec, users: [{ selector: 'waterfall.js', downstreams: [{ addr: '127.0.0.1:25' }], ...(queue ? { queue } : {}) }] }), file, {});

  test('a user with queue gets the documented defaults and a spool beside the config; without either there is no spool', async () => {
    const config = await parse({}, {});
    expect(config.users[0].queue).toEqual({ maxAgeMs: 3 * 86_400_000, firstRetryMs: 30_000, maxRetryMs: 3_600_000, bounce: false });
    expect(config.spool).toEqual({ dir: path.join(os.tmpdir(), 'conf', 'spool'), maxSize: 2 * 1024 ** 3, pollIntervalMs: 1000, concurrency: 4 });
    expect((await parse({})).spool).toBeUndefined();
    const custom = await parse({ spool: { dir: '/var/spool/smtpmux', max_size: '10MB' } }, { max_age: '2h', first_retry: '1.5s', max_retry: '10m' });
    expect(custom.users[0].queue).toEqual({ maxAgeMs: 7_200_000, firstRetryMs: 1500, maxRetryMs: 600_000, bounce: false });
    expect(custom.spool).toMatchObject({ dir: '/var/spool/smtpmux', maxSize: 10 * 1024 ** 2 });
  });

  test('a bad duration or a first_retry past max_retry is named by key', async () => {
    const problemsOf = (queue: Record<string, string>) => parse({}, queue).then(() => [], (err: ConfigError) => err.problems);
    expect(await problemsOf({ max_age: '3 weeks' })).toEqual([
      expect.stringMatching(/users\[0\]\.queue\.max_age: "3 weeks" is not a duration \(use a number with ms, s, m, h or d/),
    ]);
    expect(await problemsOf({ first_retry: '2h', max_retry: '1h' })).toEqual([
      expect.stringMatching(/users\[0\]\.queue\.first_retry: first_retry must not be longer than max_retry/),
    ]);
  });
});
