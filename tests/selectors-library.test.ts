// The bundled selector library (selectors/*.js), run in the real sandbox against a fake RunHost that
// plays each downstream's answer to send(): no network, so every strategy's order and failover can be
// checked message by message. Also type-checks the library against selectors/smtpmux.d.ts.
import { spawnSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { SelectorSandbox } from '../src/selector/sandbox';
import { SelectorState } from '../src/selector/state';
import { MemoryStateStore } from '../src/state/memory';
import type { DownstreamView, MessageSummary, RunHost, SelectorOutcome, SendRecord } from '../src/selector/types';

const ROOT = path.resolve(__dirname, '..');
const SELECTORS = path.join(ROOT, 'selectors');
const TSC = path.join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc');
const LIMITS = { timeoutMs: 2000, memoryMb: 32 };

const sandboxes: SelectorSandbox[] = [];
afterAll(() => sandboxes.forEach((sandbox) => sandbox.dispose()));

async function load(file: string): Promise<SelectorSandbox> {
  const sandbox = await SelectorSandbox.load(path.join(SELECTORS, file), LIMITS);
  sandboxes.push(sandbox);
  return sandbox;
}

let messageCount = 0;
function message(overrides: Partial<MessageSummary> = {}): MessageSummary {
  messageCount++;
  return {
    id: `msg-${messageCount}`,
    user: 'app@example.com',
    from: 'alice@sender.example',
    to: ['bob@example.com'],
    size: 1234,
    subject: 'Hello',
    clientAddress: '127.0.0.1',
    attempt: 1,
    queuedAt: null,
    ...overrides,
  };
}

function downstream(name: string, extra: Partial<DownstreamView> = {}): DownstreamView {
  const status = { state: 'up' as const, cooldownUntil: null, failures: 0, lastError: null, quota: null, rate: null, inflight: 0 };
  return { name, addr: `${name}.example:587`, host: `${name}.example`, port: 587, tls: 'auto', tags: [], weight: 1, ...status, ...extra };
}

/** How a fake downstream answers: it accepts, or fails with this nodemailer-style error. */
type Answer = 'ok' | { code: string; responseCode?: number; permanent?: boolean };

const TEMPORARY: Answer = { code: 'ECONNECTION', permanent: false };
const REJECTED_550: Answer = { code: 'EENVELOPE', responseCode: 550, permanent: true };
const AUTH_535: Answer = { code: 'EAUTH', responseCode: 535, permanent: true };
const BUSY_451: Answer = { code: 'EMESSAGE', responseCode: 451, permanent: false };

/**
 * A RunHost that plays the given answers (unlisted downstreams accept), refuses a second delivery and
 * sends past `maxSends` like the real host, and records every send() target and log line.
 */
/** ctx.state of the fake hosts: fresh for each test. */
let store = new MemoryStateStore();
beforeEach(() => {
  store = new MemoryStateStore();
});

function fakeHost(answers: Record<string, Answer> = {}, maxSends = 5): RunHost & { sends: (string | null)[]; logs: string[] } {
  const sends: (string | null)[] = [];
  const logs: string[] = [];
  let delivered = false;
  const fail = (downstreamName: string | null, code: string, text: string, responseCode?: number, permanent = false): SendRecord => ({
    ok: false,
    downstream: downstreamName,
    code,
    responseCode,
    response: responseCode ? `${responseCode} ${text}` : undefined,
    permanent,
    message: text,
    ms: 1,
  });
  return {
    sends,
    logs,
    state: new SelectorState(store, 'app@example.com'),
    log: (text) => logs.push(text),
    async send(target) {
      sends.push(target);
      if (sends.length > maxSends) return fail(target, 'SMTPMUX_SEND_LIMIT', 'Too many send() calls for one message');
      if (delivered) return fail(target, 'SMTPMUX_ALREADY_DELIVERED', 'This message was already delivered');
      if (target === null) return fail(null, 'SMTPMUX_UNKNOWN_DOWNSTREAM', 'No downstream by that name');
      const answer = answers[target] ?? 'ok';
      if (answer === 'ok') {
        delivered = true;
        return { ok: true, downstream: target, responseCode: 250, response: '250 2.0.0 Ok: queued', ms: 1 };
      }
      return fail(target, answer.code, `${target} says ${answer.code}`, answer.responseCode, answer.permanent ?? false);
    },
  };
}

function targets(outcome: SelectorOutcome): string[] {
  if (outcome.kind !== 'order') throw new Error(`expected an order, got ${JSON.stringify(outcome)}`);
  return outcome.targets;
}

/** Runs `count` messages and returns the order each one got. */
async function orders(sandbox: SelectorSandbox, downstreams: DownstreamView[], count: number): Promise<string[][]> {
  const out: string[][] = [];
  for (let i = 0; i < count; i++) out.push(targets(await sandbox.run(message(), downstreams, fakeHost())));
  return out;
}

function tally(names: string[]): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const name of names) counts[name] = (counts[name] ?? 0) + 1;
  return counts;
}

describe('round-robin.js', () => {
  test('round robin spreads 10 messages 5/5 over two downstreams', async () => {
    const sandbox = await load('round-robin.js');
    const firsts = (await orders(sandbox, [downstream('a'), downstream('b')], 10)).map((order) => order[0]);
    expect(firsts).toEqual(['a', 'b', 'a', 'b', 'a', 'b', 'a', 'b', 'a', 'b']);
    expect(tally(firsts)).toEqual({ a: 5, b: 5 });
  });

  test('round robin returns the whole list rotated so the others are failover', async () => {
    const sandbox = await load('round-robin.js');
    const list = [downstream('a'), downstream('b'), downstream('c')];
    expect(await orders(sandbox, list, 4)).toEqual([
      ['a', 'b', 'c'],
      ['b', 'c', 'a'],
      ['c', 'a', 'b'],
      ['a', 'b', 'c'],
    ]);
  });

  test('round robin keeps its place in ctx.state, so a freshly loaded copy (a reload) carries on the rotation', async () => {
    const list = [downstream('a'), downstream('b')];
    const before = await load('round-robin.js');
    const first = (await orders(before, list, 3)).map((order) => order[0]);
    before.dispose();
    const after = await load('round-robin.js');
    const then = (await orders(after, list, 3)).map((order) => order[0]);
    expect([...first, ...then]).toEqual(['a', 'b', 'a', 'b', 'a', 'b']);
  });
});

describe('weighted.js', () => {
  test('weighted honours 3:1 weights over 8 messages', async () => {
    const sandbox = await load('weighted.js');
    const firsts = (await orders(sandbox, [downstream('a', { weight: 3 }), downstream('b', { weight: 1 })], 8)).map((order) => order[0]);
    expect(firsts).toEqual(['a', 'a', 'b', 'a', 'a', 'a', 'b', 'a']);
    expect(tally(firsts)).toEqual({ a: 6, b: 2 });
  });

  test("weighted interleaves 5:1:1 smoothly, as nginx's algorithm does", async () => {
    const sandbox = await load('weighted.js');
    const list = [downstream('a', { weight: 5 }), downstream('b', { weight: 1 }), downstream('c', { weight: 1 })];
    const firsts = (await orders(sandbox, list, 14)).map((order) => order[0]);
    expect(firsts.join('')).toBe('aabacaa'.repeat(2));
  });

  test('weighted never puts a weight-0 downstream first but keeps it last as failover', async () => {
    const sandbox = await load('weighted.js');
    const list = [downstream('spare', { weight: 0 }), downstream('a', { weight: 1 }), downstream('b', { weight: 2 })];
    const all = await orders(sandbox, list, 6);
    for (const order of all) {
      expect(order).toHaveLength(3);
      expect(order[0]).not.toBe('spare');
      expect(order[2]).toBe('spare');
    }
    expect(all.map((order) => order[0])).toEqual(['b', 'a', 'b', 'b', 'a', 'b']);
  });

  test('weighted falls back to config order when every weight is 0', async () => {
    const sandbox = await load('weighted.js');
    const list = [downstream('a', { weight: 0 }), downstream('b', { weight: 0 })];
    expect(await orders(sandbox, list, 2)).toEqual([
      ['a', 'b'],
      ['a', 'b'],
    ]);
  });
});

describe('waterfall.js', () => {
  const list = [downstream('a'), downstream('b'), downstream('c')];

  test('waterfall delivers through the first downstream when it accepts', async () => {
    const sandbox = await load('waterfall.js');
    const host = fakeHost();
    expect(await sandbox.run(message(), list, host)).toEqual({ kind: 'none' });
    expect(host.sends).toEqual(['a']);
  });

  test('waterfall falls through a temporary failure to the next downstream', async () => {
    const sandbox = await load('waterfall.js');
    const host = fakeHost({ a: TEMPORARY });
    expect(await sandbox.run(message(), list, host)).toEqual({ kind: 'none' });
    expect(host.sends).toEqual(['a', 'b']);
    expect(host.logs.some((line) => line.includes('a failed') && line.includes('ECONNECTION'))).toBe(true);
  });

  test('waterfall falls through a permanent failure to the next downstream too', async () => {
    const sandbox = await load('waterfall.js');
    const host = fakeHost({ a: REJECTED_550, b: BUSY_451 });
    expect(await sandbox.run(message(), list, host)).toEqual({ kind: 'none' });
    expect(host.sends).toEqual(['a', 'b', 'c']);
  });

  test('waterfall rethrows the last error when every downstream fails', async () => {
    const sandbox = await load('waterfall.js');
    const host = fakeHost({ a: TEMPORARY, b: REJECTED_550, c: BUSY_451 });
    const outcome = await sandbox.run(message(), list, host);
    // An escaping SendError is a failure reason, not a selector fault: the host decides from the attempts.
    expect(outcome).toMatchObject({ kind: 'reason', reason: 'c says EMESSAGE' });
    expect(host.sends).toEqual(['a', 'b', 'c']);
    expect(host.logs).toHaveLength(3);
  });

  test('waterfall stops at the send limit and rethrows the last delivery error', async () => {
    const sandbox = await load('waterfall.js');
    const host = fakeHost({ a: TEMPORARY, b: TEMPORARY }, 2);
    const outcome = await sandbox.run(message(), list, host);
    expect(outcome).toMatchObject({ kind: 'reason', reason: 'b says ECONNECTION' });
    expect(host.sends).toEqual(['a', 'b', 'c']);
  });
});

describe('by-recipient-domain.js', () => {
  const list = [
    downstream('relay', { tags: ['default'] }),
    downstream('other'),
    downstream('corp', { tags: ['domain:example.com', 'domain:corp.example'] }),
    downstream('corp2', { tags: ['Domain:Example.COM'] }),
  ];

  test("by-recipient-domain puts the downstreams tagged for the first recipient's domain first", async () => {
    const sandbox = await load('by-recipient-domain.js');
    const outcome = await sandbox.run(message({ to: ['Bob@EXAMPLE.com', 'carol@elsewhere.example'] }), list, fakeHost());
    expect(targets(outcome)).toEqual(['corp', 'corp2', 'relay', 'other']);
  });

  test('by-recipient-domain decides by the first recipient only', async () => {
    const sandbox = await load('by-recipient-domain.js');
    const outcome = await sandbox.run(message({ to: ['carol@corp.example', 'bob@example.com'] }), list, fakeHost());
    expect(targets(outcome)).toEqual(['corp', 'relay', 'other', 'corp2']);
  });

  test('by-recipient-domain sends other domains to the default downstream, then the rest', async () => {
    const sandbox = await load('by-recipient-domain.js');
    const outcome = await sandbox.run(message({ to: ['dave@unknown.example'] }), list, fakeHost());
    expect(targets(outcome)).toEqual(['relay', 'other', 'corp', 'corp2']);
  });
});

describe('by-sender.js', () => {
  const list = [
    downstream('rest'),
    downstream('relay', { tags: ['default'] }),
    downstream('domain', { tags: ['sender:corp.example'] }),
    downstream('ceo', { tags: ['sender:CEO@corp.example'] }),
  ];

  test("by-sender prefers an exact address tag, then the sender's domain, then default, then the rest", async () => {
    const sandbox = await load('by-sender.js');
    const outcome = await sandbox.run(message({ from: 'ceo@Corp.Example' }), list, fakeHost());
    expect(targets(outcome)).toEqual(['ceo', 'domain', 'relay', 'rest']);
  });

  test('by-sender routes another address of a tagged domain by the domain tag', async () => {
    const sandbox = await load('by-sender.js');
    const outcome = await sandbox.run(message({ from: 'bob@corp.example' }), list, fakeHost());
    expect(targets(outcome)).toEqual(['domain', 'relay', 'rest', 'ceo']);
  });

  test('by-sender sends a null sender to the default downstream first', async () => {
    const sandbox = await load('by-sender.js');
    const outcome = await sandbox.run(message({ from: '' }), list, fakeHost());
    expect(targets(outcome)).toEqual(['relay', 'rest', 'domain', 'ceo']);
  });
});

describe('domain-then-failover.js', () => {
  const list = [downstream('relay'), downstream('backup'), downstream('corp', { tags: ['domain:example.com'] })];

  test("domain-then-failover delivers through the recipient domain's downstream first", async () => {
    const sandbox = await load('domain-then-failover.js');
    const host = fakeHost();
    expect(await sandbox.run(message({ to: ['bob@example.com'] }), list, host)).toEqual({ kind: 'none' });
    expect(host.sends).toEqual(['corp']);
  });

  test('domain-then-failover fails over past temporary and login failures to the others in config order', async () => {
    const sandbox = await load('domain-then-failover.js');
    const host = fakeHost({ corp: TEMPORARY, relay: AUTH_535 });
    expect(await sandbox.run(message({ to: ['bob@example.com'] }), list, host)).toEqual({ kind: 'none' });
    expect(host.sends).toEqual(['corp', 'relay', 'backup']);
  });

  test('domain-then-failover stops at a permanent 550 refusal of the message without trying the others', async () => {
    const sandbox = await load('domain-then-failover.js');
    const host = fakeHost({ corp: REJECTED_550 });
    const outcome = await sandbox.run(message({ to: ['bob@example.com'] }), list, host);
    expect(outcome).toMatchObject({ kind: 'reason', reason: 'corp says EENVELOPE' });
    expect(host.sends).toEqual(['corp']);
  });

  test('domain-then-failover tries every downstream in config order when no tag matches, and rethrows the last error', async () => {
    const sandbox = await load('domain-then-failover.js');
    const host = fakeHost({ relay: TEMPORARY, backup: BUSY_451, corp: TEMPORARY });
    const outcome = await sandbox.run(message({ to: ['bob@other.example'] }), list, host);
    expect(outcome).toMatchObject({ kind: 'reason', reason: 'corp says ECONNECTION' });
    expect(host.sends).toEqual(['relay', 'backup', 'corp']);
  });
});

describe('the whole library', () => {
  const FILES = ['round-robin.js', 'waterfall.js', 'weighted.js', 'by-recipient-domain.js', 'by-sender.js', 'domain-then-failover.js'];

  test.each(FILES)('%s loads as a classic script and only ever names configured downstreams', async (file) => {
    const sandbox = await load(file);
    const list = [downstream('a', { tags: ['default'] }), downstream('b', { weight: 2 })];
    const host = fakeHost();
    const outcome = await sandbox.run(message(), list, host);
    const named = outcome.kind === 'order' ? outcome.targets : host.sends;
    expect(['order', 'none']).toContain(outcome.kind);
    expect(named.length).toBeGreaterThan(0);
    for (const name of named) expect(['a', 'b']).toContain(name);
  });

  test.each(FILES)('%s answers "no downstream" with a reason rather than a fault', async (file) => {
    const sandbox = await load(file);
    expect(await sandbox.run(message(), [], fakeHost())).toEqual({ kind: 'reason', reason: 'no downstream is configured' });
  });
});

describe('type declarations (smtpmux.d.ts)', () => {
  function tsc(project: string): { status: number | null; output: string } {
    const result = spawnSync(process.execPath, [TSC, '-p', project, '--pretty', 'false'], { cwd: ROOT, encoding: 'utf8' });
    return { status: result.status, output: `${result.stdout}${result.stderr}` };
  }

  test('every selector type-checks against smtpmux.d.ts under strict checkJs', () => {
    const { status, output } = tsc(SELECTORS);
    expect(output).toBe('');
    expect(status).toBe(0);
  });

  test('the type check catches a typo like message.subjet', async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'smtpmux-selector-'));
    try {
      const declarations = path.join(SELECTORS, 'smtpmux.d.ts');
      await fs.writeFile(
        path.join(dir, 'typo.js'),
        [
          '// @ts-check',
          `/// <reference path="${declarations}" />`,
          '/** @param {Message} message @param {readonly Downstream[]} downstreams */',
          'function select(message, downstreams) {',
          '  log(message.subjet);',
          '  return downstreams[0];',
          '}',
          '',
        ].join('\n'),
      );
      await fs.writeFile(path.join(dir, 'tsconfig.json'), JSON.stringify({ extends: path.join(SELECTORS, 'tsconfig.json'), include: ['typo.js'] }));
      const { status, output } = tsc(dir);
      expect(status).not.toBe(0);
      expect(output).toMatch(/typo\.js\(5,\d+\): error TS2551: Property 'subjet' does not exist on type 'Message'/);
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
});
