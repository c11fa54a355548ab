// The downstream pool on its own, against a real smtp-server on loopback: it never opens more than
// max_connections, hands a freed connection to the next waiting message, keeps a connection after the
// downstream refuses a message (RSET), gives a waiting message up at its deadline without losing the
// slot, and sends the envelope as the client gave it (one RCPT per recipient, A-label domains).
import { SMTPServer } from 'smtp-server';
import type { DownstreamConfig } from '../src/config/load';
import { DownstreamPool, type Envelope } from '../src/delivery/pool';
import { listenOnLoopback, type Listening } from './support/downstream';

interface Recorder extends Listening {
  readonly connections: () => number;
  readonly peak: () => number;
  readonly envelopes: { from: string; to: string[] }[];
  /** MAIL and RCPT command lines as they came over the wire. */
  readonly commands: string[];
}

/** A downstream that holds each message `delayMs`, refuses RCPT TO:<refused@…> with 550, records the rest. */
async function recorder(delayMs: number): Promise<Recorder> {
  let connections = 0;
  let inFlight = 0;
  let peak = 0;
  const envelopes: { from: string; to: string[] }[] = [];
  const commands: string[] = [];
  const quiet = (): void => undefined;
  const server = new SMTPServer({
    authOptional: true,
    disabledCommands: ['STARTTLS'],
    // smtp-server logs each command line at debug level, before it decodes A-label domains.
    logger: {
      level: quiet,
      trace: quiet,
      info: quiet,
      warn: quiet,
      error: quiet,
      fatal: quiet,
      debug: (entry: { tnx?: string }, _format: string, line: string) => {
        if (entry.tnx === 'command' && /^(MAIL|RCPT) /i.test(line)) commands.push(line);
      },
    } as never,
    onConnect(_session, callback) {
      connections++;
      callback();
    },
    onRcptTo(address, _session, callback) {
      if (address.address.startsWith('refused@')) return callback(Object.assign(new Error('no such user'), { responseCode: 550 }));
      callback();
    },
    onData(stream, session, callback) {
      inFlight++;
      peak = Math.max(peak, inFlight);
      stream.resume();
      stream.on('end', () => {
        setTimeout(() => {
          inFlight--;
          envelopes.push({ from: session.envelope.mailFrom ? session.envelope.mailFrom.address : '', to: session.envelope.rcptTo.map((r) => r.address) });
          callback(null, 'OK');
        }, delayMs);
      });
    },
  });
  return { ...(await listenOnLoopback(server)), connections: () => connections, peak: () => peak, envelopes, commands };
}

function downstream(port: number): DownstreamConfig {
  return { name: 'd', addr: `127.0.0.1:${port}`, host: '127.0.0.1', port, tls: 'none', verifyTls: false, tags: [], weight: 1, count: 'messages' };
}

const RAW = Buffer.from('From: <a@example.com>\r\nTo: <b@example.org>\r\nSubject: pool\r\n\r\nhello\r\n');
const ENVELOPE: Envelope = { from: 'a@example.com', to: ['b@example.org'], use8BitMime: false, size: RAW.length };

describe('DownstreamPool', () => {
  let server: Recorder;
  let pool: DownstreamPool | undefined;

  afterEach(async () => {
    pool?.close();
    pool = undefined;
    await server.close();
  });

  test('never more than max_connections at once; queued messages take the freed connections', async () => {
    server = await recorder(150);
    pool = new DownstreamPool(downstream(server.port), { connectTimeoutMs: 2000, socketTimeoutMs: 5000, maxConnections: 2 });
    const results = await Promise.all(Array.from({ length: 6 }, () => pool!.send(ENVELOPE, RAW, { timeoutMs: 10_000 })));
    expect(results.every((r) => r.ok)).toBe(true);
    expect(server.envelopes).toHaveLength(6);
    expect(server.peak()).toBe(2);
    expect(server.connections()).toBe(2);
  });

  test('a refused recipient fails the message permanently and the connection is kept for the next one', async () => {
    server = await recorder(0);
    pool = new DownstreamPool(downstream(server.port), { connectTimeoutMs: 2000, socketTimeoutMs: 5000, maxConnections: 1 });
    const refused = await pool.send({ ...ENVELOPE, to: ['refused@example.org'] }, RAW, { timeoutMs: 5000 });
    expect(refused).toMatchObject({ ok: false, code: 'EENVELOPE', responseCode: 550, permanent: true });
    const partly = await pool.send({ ...ENVELOPE, to: ['refused@example.org', 'b@example.org'] }, RAW, { timeoutMs: 5000 });
    expect(partly).toMatchObject({ ok: true, rejected: ['refused@example.org'] });
    expect(await pool.send(ENVELOPE, RAW, { timeoutMs: 5000 })).toMatchObject({ ok: true });
    expect(server.connections()).toBe(1);
    expect(server.envelopes.map((e) => e.to)).toEqual([['b@example.org'], ['b@example.org']]);
  });

  test('a message still waiting for a connection at its deadline gives up, and the slot stays usable', async () => {
    server = await recorder(1200);
    pool = new DownstreamPool(downstream(server.port), { connectTimeoutMs: 2000, socketTimeoutMs: 5000, maxConnections: 1 });
    const slow = pool.send(ENVELOPE, RAW, { timeoutMs: 10_000 });
    const waiting = await pool.send(ENVELOPE, RAW, { timeoutMs: 300 });
    expect(waiting).toMatchObject({ ok: false, code: 'ETIMEDOUT', permanent: false });
    expect(await slow).toMatchObject({ ok: true });
    expect(await pool.send(ENVELOPE, RAW, { timeoutMs: 5000 })).toMatchObject({ ok: true });
    expect(server.envelopes).toHaveLength(2);
    expect(server.connections()).toBe(1);
  });

  test('the envelope goes out as given: one RCPT per recipient, an internationalized domain as its A-label', async () => {
    server = await recorder(0);
    pool = new DownstreamPool(downstream(server.port), { connectTimeoutMs: 2000, socketTimeoutMs: 5000, maxConnections: 1 });
    const envelope: Envelope = { from: '', to: ['safe@jõgeva.ee', 'b@example.org', 'b@example.org', 'zoë@exämple.com'], use8BitMime: false, size: RAW.length };
    expect(await pool.send(envelope, RAW, { timeoutMs: 5000 })).toMatchObject({ ok: true });
    expect(server.commands).toEqual(['MAIL FROM:<> SMTPUTF8', 'RCPT TO:<safe@xn--jgeva-dua.ee>', 'RCPT TO:<b@example.org>', 'RCPT TO:<zoë@exämple.com>']);
  });
});
