// `smtpmux try`: runs a user's selector against a made-up message and prints what it decided — the
// order it returned, or each send() it made — with simulated outcomes. Nothing is delivered unless
// --deliver is given, and then it goes through the real route, downstream pools included.
import { parseArgs } from 'node:util';
import { loadConfig, type Config } from './config/load';
import { Delivery } from './delivery/delivery';
import { MessageBody } from './message/body';
import { createLogger } from './observe/logger';
import { Metrics } from './observe/metrics';
import { decide, deliveryOptions, routeMessage } from './route';
import { describeLoadFailure, Runtime } from './runtime';
import { newMessageId } from './smtp/server';
import { SelectorState } from './selector/state';
import type { MessageSummary } from './selector/types';
import type { AttemptResult } from './delivery/pool';
import { Readable } from 'node:stream';

export const TRY_USAGE = `Usage: smtpmux try [options]

Runs a user's selector with a made-up message and prints its decision. Nothing is sent unless --deliver.

Options:
  -c, --config PATH        config file (default: $SMTPMUX_CONFIG or config/config.yaml)
  -u, --user EMAIL         whose selector to run (default: the first user)
      --from ADDR          envelope sender (default: sender@example.com)
      --to ADDR            recipient; repeat for several (default: rcpt@example.org)
      --subject TEXT       subject (default: "smtpmux try")
      --size BYTES         message size the selector is told (default: 1024)
      --fail NAME[:perm]   simulate that downstream failing, temporarily (451) or permanently (:perm, 550);
                           repeat for several
      --times N            run N messages in a row, to see rotation (default: 1)
      --deliver            really send one test message through the proxy's route
      --json               print one JSON object per message instead of text`;

interface TryOptions {
  config: string;
  user?: string;
  from: string;
  to: string[];
  subject: string;
  size: number;
  fail: Map<string, 'temp' | 'perm'>;
  times: number;
  deliver: boolean;
  json: boolean;
}

function parse(argv: string[]): TryOptions {
  const { values } = parseArgs({
    args: argv,
    options: {
      config: { type: 'string', short: 'c' },
      user: { type: 'string', short: 'u' },
      from: { type: 'string' },
      to: { type: 'string', multiple: true },
      subject: { type: 'string' },
      size: { type: 'string' },
      fail: { type: 'string', multiple: true },
      times: { type: 'string' },
      deliver: { type: 'boolean' },
      json: { type: 'boolean' },
    },
    strict: true,
  });
  const fail = new Map<string, 'temp' | 'perm'>();
  for (const item of values.fail ?? []) {
    const [name, kind] = item.split(/:(?=[^:]*$)/);
    if (kind !== undefined && kind !== 'perm' && kind !== 'temp') fail.set(item, 'temp');
    else fail.set(name, kind === 'perm' ? 'perm' : 'temp');
  }
  const times = Number(values.times ?? 1);
  if (!Number.isInteger(times) || times < 1 || times > 1000) throw new Error('--times takes a whole number from 1 to 1000');
  return {
    config: values.config ?? process.env.SMTPMUX_CONFIG ?? 'config/config.yaml',
    user: values.user,
    from: values.from ?? 'sender@example.com',
    to: values.to?.length ? values.to : ['rcpt@example.org'],
    subject: values.subject ?? 'smtpmux try',
    size: Number(values.size ?? 1024),
    fail,
    times,
    deliver: values.deliver ?? false,
    json: values.json ?? false,
  };
}

const SKIP_TEXT = { cooling: 'cooling down', rate: 'at its rate limit', quota: 'out of quota' } as const;

/** A downstream's simulated answer: accepted, or the failure --fail asked for. */
function simulate(name: string, fail: Map<string, 'temp' | 'perm'>): AttemptResult {
  const kind = fail.get(name);
  if (kind === 'perm') return { ok: false, code: 'EENVELOPE', responseCode: 550, response: '550 5.1.1 simulated permanent failure', permanent: true, backoff: false, message: 'simulated permanent failure' };
  if (kind === 'temp') return { ok: false, code: 'ECONNECTION', responseCode: 451, response: '451 4.4.1 simulated temporary failure', permanent: false, backoff: true, message: 'simulated temporary failure' };
  return { ok: true, responseCode: 250, response: '250 2.0.0 simulated OK', rejected: [] };
}

export async function runTry(argv: string[]): Promise<number> {
  let options: TryOptions;
  try {
    options = parse(argv);
  } catch (err) {
    console.error(`smtpmux try: ${(err as Error).message}\n\n${TRY_USAGE}`);
    return 2;
  }
  let config: Config;
  let runtime: Runtime;
  try {
    config = await loadConfig(options.config);
    ({ runtime } = await Runtime.build(config));
  } catch (err) {
    // What is wrong, each problem on its own line with its file:line:col, as `smtpmux check` prints it.
    const loadFailure = describeLoadFailure(err);
    if (!loadFailure) throw err;
    console.error(`smtpmux try: ${loadFailure}`);
    return 1;
  }
  try {
    const user = options.user ? runtime.user(options.user) : runtime.user(config.users[0].email);
    if (!user) {
      console.error(`smtpmux try: no user "${options.user}" in ${config.file} (users: ${runtime.userEmails.join(', ')})`);
      return 2;
    }
    for (const name of options.fail.keys()) if (!user.targets.has(name)) console.error(`warning: --fail ${name}: no such downstream for ${user.email}`);
    const selector = user.selectorLabel;
    if (!options.json) console.log(`selector ${selector} for ${user.email}; downstreams: ${user.downstreams.map((d) => d.name).join(', ')}`);

    let failures = 0;
    // --deliver goes through the proxy's route, which logs; only its warnings are worth showing here.
    const deliverLog = createLogger({ level: 'warn' });
    const unread = new Metrics({ defaultMetrics: false });
    for (let i = 1; i <= options.times; i++) {
      const message: MessageSummary = {
        id: newMessageId(),
        user: user.email,
        from: options.from,
        to: options.to,
        size: options.size,
        subject: options.subject,
        clientAddress: '127.0.0.1',
        attempt: 1,
        queuedAt: null,
      };
      if (options.deliver) {
        const raw = `From: <${options.from}>\r\nTo: ${options.to.map((t) => `<${t}>`).join(', ')}\r\nSubject: ${options.subject}\r\nMessage-ID: <${message.id}@smtpmux.try>\r\nDate: ${new Date().toUTCString()}\r\n\r\nA test message sent by smtpmux try.\r\n`;
        const body = await MessageBody.receive(Readable.from([Buffer.from(raw)]), { maxSize: config.maxMessageSize });
        const envelope = { from: options.from, to: options.to, use8BitMime: false, size: body.size };
        // A registry of its own that nothing reads: try counts nothing the proxy shows.
        const routed = await routeMessage(runtime, user, { ...message, size: body.size }, envelope, body, deliverLog, unread);
        await body.dispose();
        if (routed.error) failures++;
        console.log(routed.error ? `message ${i}: ${routed.error.responseCode} ${routed.error.message}` : `message ${i}: delivered via ${routed.downstream}`);
        continue;
      }
      const sends: string[] = [];
      const logs: string[] = [];
      // The same Delivery the proxy uses, so the latch and the send cap behave as they will for real,
      // with downstreams that answer as --fail says instead of over the network.
      const simulated = new Map(
        [...user.targets].map(([key, target]) => [key, { ...target, pool: { send: async () => simulate(target.name, options.fail) } }]),
      );
      const delivery = new Delivery({ open: () => Buffer.alloc(0) }, { from: options.from, to: options.to, use8BitMime: false, size: options.size }, simulated, deliveryOptions(config, message.id));
      const { outcome, verdict } = await decide(user, message, delivery, {
        send: async (target) => {
          const record = await delivery.send(target);
          sends.push(`send(${JSON.stringify(target)}) → ${record.ok ? `accepted by ${record.downstream}` : `${record.code}${record.responseCode ? ` ${record.responseCode}` : ''}${record.permanent ? ' (permanent)' : ' (temporary)'}`}`);
          return record;
        },
        log: (text) => logs.push(text),
        state: new SelectorState(runtime.state, user.email),
      });
      if (!verdict.delivered) failures++;
      const reply = verdict.error ? `${verdict.error.responseCode} ${verdict.error.message}` : `250 delivered via ${verdict.downstream} (simulated)`;
      if (options.json) {
        console.log(JSON.stringify({ message: i, outcome, sends, attempts: delivery.attempts, logs, problems: delivery.problems, reply }));
        continue;
      }
      console.log(`\nmessage ${i}:`);
      for (const line of logs) console.log(`  log: ${line}`);
      if (outcome.kind === 'order') console.log(`  returned order: ${outcome.targets.join(' → ')}`);
      else if (outcome.kind === 'reason') console.log(`  gave up: ${outcome.reason}${outcome.location ? ` (${outcome.location})` : ''}`);
      else if (outcome.kind === 'fault') console.log(`  selector ${outcome.fault}: ${outcome.detail}${outcome.location ? ` at ${outcome.location}` : ''}`);
      for (const line of sends) console.log(`  ${line}`);
      for (const a of delivery.attempts) {
        // What the host did on its own: skipped a downstream (cooling, rate, quota) or probed a cooling one.
        if (a.skipped) console.log(`  skipped ${a.downstream}: ${SKIP_TEXT[a.skipped]} until ${a.until}`);
        else if (outcome.kind === 'order' || a.probe) console.log(`  ${a.probe ? 'probed' : 'tried'} ${a.downstream}: ${a.ok ? 'accepted' : `${a.code} ${a.responseCode ?? ''}`.trim()}`);
        if (a.coolingUntil) console.log(`  ${a.downstream} cools down until ${a.coolingUntil}`);
      }
      for (const problem of delivery.problems) console.log(`  problem: ${problem}`);
      console.log(`  reply: ${reply}`);
    }
    return failures === 0 ? 0 : 1;
  } finally {
    runtime.retire();
  }
}
