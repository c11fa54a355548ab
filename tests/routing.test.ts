// Routing over real loopback SMTP: the bundled strategies and the two ways a selector answers (a list
// of downstreams for the host to try, or send() calls of its own), failover, and the verdicts when
// nothing accepts.
import { deadPort, startDownstream, subjectOf, type Downstream } from './support/downstream';
import { testConfig, TEST_LIMITS } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { sendWithNodemailer } from './support/clients';

const open: { close(): Promise<void> }[] = [];
afterEach(async () => {
  for (const item of open.splice(0).reverse()) await item.close();
});

async function downstream(options: Parameters<typeof startDownstream>[0] = {}): Promise<Downstream> {
  const ds = await startDownstream(options);
  open.push(ds);
  return ds;
}

async function proxy(files: Record<string, string>): Promise<RunningProxy> {
  const p = await startProxy(files);
  open.push({ close: () => p.stop() });
  return p;
}

/** The one-per-message outcome log lines so far, in order. */
function outcomes(p: RunningProxy): Record<string, unknown>[] {
  return p.logs.filter((l) => typeof l.outcome === 'string');
}

describe('routing', () => {
  test('round robin spreads 10 messages 5/5 over two downstreams', async () => {
    const a = await downstream();
    const b = await downstream();
    const p = await proxy({
      'config.yaml': testConfig({ selector: 'round-robin.js', ...TEST_LIMITS, downstreams: [{ name: 'a', addr: a.addr }, { name: 'b', addr: b.addr }] }),
    });
    for (let i = 0; i < 10; i++) {
      expect(await sendWithNodemailer(p.port, { subject: `rr ${i}` })).toMatchObject({ ok: true });
    }
    expect(a.received).toHaveLength(5);
    expect(b.received).toHaveLength(5);
    // Strict alternation: even messages to a, odd to b.
    expect(a.received.map((r) => subjectOf(r.raw))).toEqual(['rr 0', 'rr 2', 'rr 4', 'rr 6', 'rr 8']);
    expect(b.received.map((r) => subjectOf(r.raw))).toEqual(['rr 1', 'rr 3', 'rr 5', 'rr 7', 'rr 9']);
  });

  test('waterfall skips a downstream that is down and one that answers 451, delivering to the third', async () => {
    const busy = await downstream({ fail: { kind: 'reply', code: 451, message: '4.3.0 Try again later' } });
    const good = await downstream();
    const down = await deadPort();
    const p = await proxy({
      'config.yaml': testConfig({
        selector: 'waterfall.js',
        ...TEST_LIMITS,
        downstreams: [
          { name: 'down', addr: `127.0.0.1:${down}` },
          { name: 'busy', addr: busy.addr },
          { name: 'good', addr: good.addr },
        ],
      }),
    });
    const sent = await sendWithNodemailer(p.port, { subject: 'waterfall' });
    expect(sent).toMatchObject({ ok: true, code: 250 });
    expect(sent.response).toMatch(/via good/);
    expect(good.received).toHaveLength(1);
    expect(busy.received).toHaveLength(0);
    const [line] = outcomes(p);
    const attempts = line.attempts as { downstream: string; ok: boolean; responseCode?: number }[];
    expect(attempts.map((a) => [a.downstream, a.ok])).toEqual([
      ['down', false],
      ['busy', false],
      ['good', true],
    ]);
    expect(attempts[1].responseCode).toBe(451);
  });

  test('every downstream down gives 451 4.4.1 and nothing is delivered', async () => {
    const [d1, d2] = [await deadPort(), await deadPort()];
    const p = await proxy({
      'config.yaml': testConfig({ selector: 'waterfall.js', ...TEST_LIMITS, downstreams: [{ name: 'd1', addr: `127.0.0.1:${d1}` }, { name: 'd2', addr: `127.0.0.1:${d2}` }] }),
    });
    const sent = await sendWithNodemailer(p.port, { subject: 'nowhere' });
    expect(sent.ok).toBe(false);
    expect(sent.code).toBe(451);
    expect(sent.response).toMatch(/^451 4\.4\.1 /);
    const [line] = outcomes(p);
    expect(line).toMatchObject({ outcome: 'deferred', code: 'SMTPMUX_DOWNSTREAMS_UNAVAILABLE' });
    expect((line.attempts as unknown[]).length).toBe(2);
  });

  test('every downstream refusing permanently (550) gives a 5xx and nothing is delivered', async () => {
    const r1 = await downstream({ fail: { kind: 'reply', code: 550, message: '5.7.1 Relaying denied' } });
    const r2 = await downstream({ fail: { kind: 'reply', code: 550, message: '5.7.1 Relaying denied' } });
    const p = await proxy({
      'config.yaml': testConfig({ selector: 'waterfall.js', ...TEST_LIMITS, downstreams: [{ name: 'r1', addr: r1.addr }, { name: 'r2', addr: r2.addr }] }),
    });
    const sent = await sendWithNodemailer(p.port, { subject: 'refused' });
    expect(sent.ok).toBe(false);
    expect(sent.code).toBe(550);
    expect(sent.response).toMatch(/^550 5\.7\.1 /);
    expect(r1.received.length + r2.received.length).toBe(0);
    expect(outcomes(p)[0]).toMatchObject({ outcome: 'rejected', code: 'SMTPMUX_DOWNSTREAM_REJECTED' });
  });

  test('one permanent refusal and one temporary failure give a 4xx', async () => {
    const refusing = await downstream({ fail: { kind: 'reply', code: 550, message: '5.7.1 Relaying denied' } });
    const busy = await downstream({ fail: { kind: 'reply', code: 451, message: '4.3.0 Try again later' } });
    const p = await proxy({
      'config.yaml': testConfig({ selector: 'waterfall.js', ...TEST_LIMITS, downstreams: [{ name: 'refusing', addr: refusing.addr }, { name: 'busy', addr: busy.addr }] }),
    });
    const sent = await sendWithNodemailer(p.port, { subject: 'mixed' });
    expect(sent.ok).toBe(false);
    expect(sent.response).toMatch(/^451 4\.4\.1 /);
  });

  test('an ordered list returned by the selector fails over in its order', async () => {
    const busy = await downstream({ fail: { kind: 'reply', code: 421, message: '4.7.0 Too busy' } });
    const first = await downstream();
    const second = await downstream();
    const down = await deadPort();
    const p = await proxy({
      // Objects and names mixed: the last configured downstream first, then the dead one, then busy.
      'ordered.js': `function select(message, downstreams) {
        const byName = Object.fromEntries(downstreams.map((d) => [d.name, d]));
        return [byName.down, 'busy', byName.second, 'first'];
      }`,
      'config.yaml': testConfig({
        selector: 'ordered.js',
        ...TEST_LIMITS,
        downstreams: [
          { name: 'first', addr: first.addr },
          { name: 'busy', addr: busy.addr },
          { name: 'down', addr: `127.0.0.1:${down}` },
          { name: 'second', addr: second.addr },
        ],
      }),
    });
    expect(await sendWithNodemailer(p.port, { subject: 'ordered' })).toMatchObject({ ok: true });
    expect(second.received).toHaveLength(1);
    expect(first.received).toHaveLength(0);
    const attempts = outcomes(p)[0].attempts as { downstream: string; ok: boolean }[];
    expect(attempts.map((a) => a.downstream)).toEqual(['down', 'busy', 'second']);
  });

  test('a selector returning a downstream name string delivers there', async () => {
    const a = await downstream();
    const b = await downstream();
    const p = await proxy({
      'by-name.js': `function select() { return 'b'; }`,
      'config.yaml': testConfig({ selector: 'by-name.js', ...TEST_LIMITS, downstreams: [{ name: 'a', addr: a.addr }, { name: 'b', addr: b.addr }] }),
    });
    for (let i = 0; i < 2; i++) expect(await sendWithNodemailer(p.port, { subject: `name ${i}` })).toMatchObject({ ok: true });
    expect(b.received).toHaveLength(2);
    expect(a.received).toHaveLength(0);
  });

  test('a selector returning a downstream addr string delivers there', async () => {
    const a = await downstream();
    const b = await downstream();
    const p = await proxy({
      'by-addr.js': `function select(message, downstreams) { return downstreams[1].addr; }`,
      'config.yaml': testConfig({ selector: 'by-addr.js', ...TEST_LIMITS, downstreams: [{ name: 'a', addr: a.addr }, { name: 'b', addr: b.addr }] }),
    });
    expect(await sendWithNodemailer(p.port, { subject: 'addr' })).toMatchObject({ ok: true });
    expect(b.received).toHaveLength(1);
  });

  test('a selector returning a string that names no downstream fails the message with 451 and its reason logged', async () => {
    const a = await downstream();
    const p = await proxy({
      'refuse.js': `function select() { return 'no route for this sender'; }`,
      'config.yaml': testConfig({ selector: 'refuse.js', ...TEST_LIMITS, downstreams: [{ name: 'a', addr: a.addr }] }),
    });
    const sent = await sendWithNodemailer(p.port, { subject: 'reason' });
    expect(sent).toMatchObject({ ok: false, code: 451 });
    expect(a.received).toHaveLength(0);
    expect(outcomes(p)[0].selectorResult).toMatchObject({ kind: 'reason', reason: 'no route for this sender' });
  });

  test('the send() cap (limits.max_sends) is enforced', async () => {
    const busy = await downstream({ fail: { kind: 'reply', code: 451, message: '4.3.0 Try again later' } });
    const spare = await downstream();
    const p = await proxy({
      // Keeps calling send() on a failing downstream and reports the codes it got, then tries the spare.
      'greedy.js': `async function select(message, downstreams) {
        const codes = [];
        for (let i = 0; i < 5; i++) {
          try { await send('busy'); codes.push('ok'); } catch (err) { codes.push(err.code); }
        }
        try { await send('spare'); codes.push('ok'); } catch (err) { codes.push(err.code); }
        log('codes=' + codes.join(','));
        throw new Error('gave up');
      }`,
      'config.yaml': testConfig({
        selector: 'greedy.js',
        ...TEST_LIMITS,
        limits: { ...TEST_LIMITS.limits, max_sends: 2 },
        downstreams: [{ name: 'busy', addr: busy.addr }, { name: 'spare', addr: spare.addr }],
      }),
    });
    const sent = await sendWithNodemailer(p.port, { subject: 'greedy' });
    expect(sent).toMatchObject({ ok: false, code: 451 });
    expect(spare.received).toHaveLength(0);
    const scriptLine = p.logs.find((l) => typeof l.msg === 'string' && l.msg.startsWith('codes='));
    expect(scriptLine?.msg).toBe('codes=EMESSAGE,EMESSAGE,SMTPMUX_SEND_LIMIT,SMTPMUX_SEND_LIMIT,SMTPMUX_SEND_LIMIT,SMTPMUX_SEND_LIMIT');
    const line = outcomes(p)[0];
    expect((line.attempts as unknown[]).length).toBe(2);
    expect(String(line.problems)).toMatch(/Too many send\(\) calls for one message \(limit 2\)/);
  });
});
