// /metrics over HTTP after real messages through the proxy: the counters say what was sent, delivered,
// deferred and rejected, attempts by downstream and result, timings, logins, reloads and selector
// restarts; label values come from the config only; each App has its own registry.
import { deadPort, startDownstream, type Downstream } from './support/downstream';
import { testConfig, TEST_LIMITS } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { sendWithNodemailer } from './support/clients';
import net from 'node:net';
import { get, sample, scrape, total } from './support/admin';

/** The subject picks the route: a made-up name, a 451, a 550, a failover, an overrun. */
const SELECTOR = `
function select(message) {
  switch (message.subject) {
    case 'ok': return ['good'];
    case 'defer': return ['flaky'];
    case 'reject': return ['refuser'];
    case 'failover': return ['flaky', 'good'];
    case 'made-up': return ['nowhere-' + message.from];
    case 'loop': for (;;) {}
  }
  return 'no route for ' + message.subject;
}
`;

describe('/metrics after real messages', () => {
  let good: Downstream;
  let flaky: Downstream;
  let refuser: Downstream;
  let proxy: RunningProxy;

  beforeAll(async () => {
    good = await startDownstream();
    flaky = await startDownstream({ fail: { kind: 'reply', code: 451, message: '4.3.0 try later' } });
    refuser = await startDownstream({ fail: { kind: 'reply', code: 550, message: '5.1.1 no such user' } });
    proxy = await startProxy({
      'route.js': SELECTOR,
      'config.yaml': testConfig({
        selector: 'route.js',
        downstreams: [
          { name: 'good', addr: good.addr },
          { name: 'flaky', addr: flaky.addr },
          { name: 'refuser', addr: refuser.addr },
        ],
        ...TEST_LIMITS,
      }),
    });
  });

  afterAll(async () => {
    await proxy?.stop();
    await Promise.all([good, flaky, refuser].map((d) => d?.close()));
  });

  test('start at zero for every configured user and downstream, with process metrics beside them', async () => {
    const text = await scrape(proxy.httpPort!);
    for (const outcome of ['delivered', 'deferred', 'rejected']) expect(sample(text, 'smtpmux_messages_total', { user: 'test@user.com', outcome })).toBe(0);
    for (const downstream of ['good', 'flaky', 'refuser']) {
      expect(sample(text, 'smtpmux_delivery_attempts_total', { downstream, result: 'ok' })).toBe(0);
      expect(sample(text, 'smtpmux_downstream_up', { downstream })).toBe(1);
    }
    expect(text).toMatch(/^smtpmux_config_info\{hash="[0-9a-f]{12}"\} 1$/m);
    expect(sample(text, 'process_cpu_user_seconds_total')).toBeGreaterThan(0);
    expect(sample(text, 'nodejs_heap_size_total_bytes')).toBeGreaterThan(0);
    expect(text).toContain('# TYPE smtpmux_message_duration_seconds histogram');
    expect(sample(text, 'smtpmux_state_degraded', { backend: 'memory' })).toBe(0);
    expect(sample(text, 'smtpmux_state_local_operations_total')).toBe(0);
  });

  test('count what was sent, delivered, deferred and rejected, and every attempt', async () => {
    const plan: Record<string, number> = { ok: 3, defer: 2, reject: 1, failover: 2, 'made-up': 1 };
    const replies: Record<string, (number | undefined)[]> = {};
    for (const [subject, times] of Object.entries(plan)) {
      for (let i = 0; i < times; i++) {
        const sent = await sendWithNodemailer(proxy.port, { subject, to: 'secret-rcpt@example.org' });
        (replies[subject] ??= []).push(sent.ok ? 250 : sent.code);
      }
    }
    expect(replies).toEqual({ ok: [250, 250, 250], defer: [451, 451], reject: [550], failover: [250, 250], 'made-up': [451] });

    const text = await scrape(proxy.httpPort!);
    const messages = (outcome: string): number | undefined => sample(text, 'smtpmux_messages_total', { user: 'test@user.com', outcome });
    expect(messages('delivered')).toBe(5);
    expect(messages('deferred')).toBe(3);
    expect(messages('rejected')).toBe(1);
    expect(good.received).toHaveLength(5);

    const attempts = (downstream: string, result: string): number | undefined => sample(text, 'smtpmux_delivery_attempts_total', { downstream, result });
    expect(attempts('good', 'ok')).toBe(5);
    expect(attempts('flaky', 'temporary')).toBe(4);
    expect(attempts('refuser', 'permanent')).toBe(1);
    expect(total(text, 'smtpmux_delivery_attempts_total')).toBe(10);

    // One observation per message, in the right buckets' range.
    expect(total(text, 'smtpmux_message_duration_seconds_count')).toBe(9);
    expect(sample(text, 'smtpmux_message_duration_seconds_count', { outcome: 'delivered' })).toBe(5);
    expect(sample(text, 'smtpmux_selector_duration_seconds_count')).toBe(9);
    expect(sample(text, 'smtpmux_selector_duration_seconds_sum')).toBeLessThan(9);

    // Label values come from the config only: not the made-up downstream, not a recipient or a sender.
    expect(text).not.toContain('nowhere-');
    expect(text).not.toContain('secret-rcpt');
    expect(text).not.toContain('app@example.com');
  });

  test('count failed logins, by reason, without the login tried', async () => {
    const before = sample(await scrape(proxy.httpPort!), 'smtpmux_auth_failures_total', { reason: 'credentials' }) ?? 0;
    const sent = await sendWithNodemailer(proxy.port, { subject: 'ok' }, { user: 'guess@evil.example', pass: 'nope' });
    expect(sent.code).toBe(535);
    const text = await scrape(proxy.httpPort!);
    expect(sample(text, 'smtpmux_auth_failures_total', { reason: 'credentials' })).toBe(before + 1);
    expect(text).not.toContain('guess@evil.example');
  });

  test('count a selector restart after an overrun, by selector file and reason', async () => {
    const sent = await sendWithNodemailer(proxy.port, { subject: 'loop' });
    expect(sent.code).toBe(451);
    const text = await scrape(proxy.httpPort!);
    expect(total(text, 'smtpmux_selector_restarts_total', { reason: 'timeout' })).toBe(1);
    expect(text).toMatch(/^smtpmux_selector_restarts_total\{selector="[^"]*route\.js",reason="timeout"\} 1$/m);
    // The isolate is rebuilt: the next message goes through.
    expect((await sendWithNodemailer(proxy.port, { subject: 'ok' })).ok).toBe(true);
  });

  test('count reloads by result and follow the config hash', async () => {
    const hashOf = (text: string): string | undefined => /^smtpmux_config_info\{hash="([0-9a-f]+)"\} 1$/m.exec(text)?.[1];
    const before = hashOf(await scrape(proxy.httpPort!));
    proxy.write('config.yaml', testConfig({ selector: 'route.js', downstreams: [{ name: 'good', addr: good.addr }], ...TEST_LIMITS }));
    expect((await proxy.app.reload()).ok).toBe(true);
    proxy.write('config.yaml', 'users: [');
    expect((await proxy.app.reload()).ok).toBe(false);
    const text = await scrape(proxy.httpPort!);
    expect(sample(text, 'smtpmux_reloads_total', { result: 'ok' })).toBe(1);
    expect(sample(text, 'smtpmux_reloads_total', { result: 'failed' })).toBe(1);
    const after = hashOf(text);
    expect(after).toBeDefined();
    expect(after).not.toBe(before);
    // Only the running config's hash is shown.
    expect(text.match(/^smtpmux_config_info\{/gm)).toHaveLength(1);
  });

  test('each App counts in its own registry', async () => {
    const other = await startProxy({ 'config.yaml': testConfig({ selector: 'round-robin.js', downstreams: [{ name: 'good', addr: good.addr }] }) });
    try {
      const text = await scrape(other.httpPort!);
      expect(sample(text, 'smtpmux_messages_total', { user: 'test@user.com', outcome: 'delivered' })).toBe(0);
      expect(sample(text, 'smtpmux_delivery_attempts_total', { downstream: 'good', result: 'ok' })).toBe(0);
    } finally {
      await other.stop();
    }
  });
});

describe('/metrics counts connections', () => {
  /** Opens a connection and resolves with its first line (the greeting or a refusal). */
  function greet(port: number): Promise<{ socket: net.Socket; line: string }> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ host: '127.0.0.1', port });
      socket.once('error', reject);
      socket.once('data', (chunk) => resolve({ socket, line: chunk.toString('latin1').split('\r\n')[0] }));
    });
  }

  test('open now, and refused at connect by reason', async () => {
    const proxy = await startProxy({ 'config.yaml': testConfig({ selector: 'round-robin.js', downstreams: [{ addr: '127.0.0.1:9' }], max_connections: 1 }) });
    const sockets: net.Socket[] = [];
    try {
      const first = await greet(proxy.port);
      sockets.push(first.socket);
      expect(first.line).toMatch(/^220 /);
      expect(sample(await scrape(proxy.httpPort!), 'smtpmux_connections')).toBe(1);
      const second = await greet(proxy.port);
      sockets.push(second.socket);
      expect(second.line).toMatch(/^421 /);
      expect(sample(await scrape(proxy.httpPort!), 'smtpmux_connections_refused_total', { reason: 'too_many_connections' })).toBe(1);
    } finally {
      for (const socket of sockets) socket.destroy();
      await proxy.stop();
    }
  });
});

describe('/metrics and the status page read the downstreams\' state', () => {
  test('a cooling downstream is down and skipped; a quota shows what is left', async () => {
    const good = await startDownstream();
    const dead = `127.0.0.1:${await deadPort()}`;
    const proxy = await startProxy({
      'order.js': "function select() { return ['dead', 'good']; }",
      'config.yaml': testConfig({
        selector: 'order.js',
        downstreams: [
          { name: 'dead', addr: dead, cooldown: '1m' },
          { name: 'good', addr: good.addr, quota: '10/h' },
        ],
        ...TEST_LIMITS,
      }),
    });
    try {
      // The first message finds dead refusing connections (a back-off signal: it cools) and fails over;
      // the second skips it.
      for (const subject of ['first', 'second']) expect((await sendWithNodemailer(proxy.port, { subject })).ok).toBe(true);
      const text = await scrape(proxy.httpPort!);
      const user = 'test@user.com';
      expect(sample(text, 'smtpmux_downstream_up', { user, downstream: 'dead' })).toBe(0);
      expect(sample(text, 'smtpmux_downstream_up', { user, downstream: 'good' })).toBe(1);
      expect(sample(text, 'smtpmux_delivery_attempts_total', { downstream: 'dead', result: 'temporary' })).toBe(1);
      expect(sample(text, 'smtpmux_delivery_attempts_total', { downstream: 'dead', result: 'skipped' })).toBe(1);
      expect(sample(text, 'smtpmux_delivery_attempts_total', { downstream: 'good', result: 'ok' })).toBe(2);
      expect(sample(text, 'smtpmux_downstream_quota_remaining', { user, downstream: 'good' })).toBe(8);
      expect(sample(text, 'smtpmux_downstream_quota_remaining', { user, downstream: 'dead' })).toBeUndefined();

      const page = (await get(proxy.httpPort!, '/')).text;
      expect(page).toMatch(/<b>dead<\/b>[\s\S]*cooling<\/span> <small>for \d+ s<\/small><br><small class="muted">1 failure\(s\) in a row, last E[A-Z]+<\/small>[\s\S]*0 ok · 1 failed · 1 skipped/);
      expect(page).toMatch(/<b>good<\/b>[\s\S]*2 ok · 0 failed[\s\S]*2 \/ 10/);
    } finally {
      await proxy.stop();
      await good.close();
    }
  });
});
