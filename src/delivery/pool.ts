// One downstream SMTP server as a pool of nodemailer SMTPConnections, reused across messages. A pool is
// identified by its connection settings (`poolKey`), so a reload that leaves a downstream's settings
// alone keeps its open connections.
//
// The pool drives SMTPConnection (nodemailer's documented SMTP client) itself rather than through
// nodemailer's Mailer and its pool: a relayed message is raw bytes with an envelope that smtp-server has
// already parsed, and the Mailer's per-message work for a raw message (a MIME tree node, address parsing,
// a random boundary, a stream pipeline) was about a sixth of the CPU a small message cost the proxy.
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { BlockList, isIP } from 'node:net';
import type { Readable } from 'node:stream';
import { domainToASCII } from 'node:url';
import SMTPConnection from 'nodemailer/lib/smtp-connection';
import type { DownstreamConfig } from '../config/load';
import { stuffingSource } from '../message/dot-stuffing';
import { isTransientError } from 'nodemailer/lib/errors';
import { classifyFailure, type AttemptFailure } from './classify';

export interface PoolSettings {
  readonly connectTimeoutMs: number;
  readonly socketTimeoutMs: number;
  readonly maxConnections: number;
  /** Our name in EHLO. */
  readonly hostname?: string;
}

export interface Envelope {
  readonly from: string;
  readonly to: readonly string[];
  readonly use8BitMime: boolean;
  readonly size: number;
}

/**
 * The bytes of one attempt: the body as received (a Buffer, or a spilled body's file), or a maker of
 * streams built for this attempt (a From rewrite of a spilled body). Each try of an attempt reads the
 * bytes from the start (see DownstreamPool.attempt).
 */
export type RawMessage = Buffer | { readonly path: string } | { readonly stream: () => Readable };

export type AttemptResult =
  | { readonly ok: true; readonly responseCode: number; readonly response: string; readonly rejected: readonly string[] }
  | ({ readonly ok: false } & AttemptFailure);

/** A stable identity for a downstream's connection settings; credentials enter only as a hash. */
export function poolKey(ds: DownstreamConfig, settings: PoolSettings): string {
  const secret = createHash('sha256').update(`${ds.user ?? ''}\0${ds.pass ?? ''}`).digest('hex').slice(0, 16);
  return JSON.stringify([ds.host, ds.port, ds.tls, ds.verifyTls, secret, settings.connectTimeoutMs, settings.socketTimeoutMs, settings.maxConnections, settings.hostname ?? '']);
}

// Two lists: one BlockList with an IPv4 subnet would also match IPv4-mapped IPv6 addresses.
const LOOPBACK_V4 = new BlockList();
LOOPBACK_V4.addSubnet('127.0.0.0', 8, 'ipv4');
const LOOPBACK_V6 = new BlockList();
LOOPBACK_V6.addAddress('::1', 'ipv6');

/**
 * True only for a loopback address (127.0.0.0/8, ::1), never for a host name: `127.example.com` or a
 * name that resolves anywhere is not on this machine as far as sending a password in the clear goes.
 * An IPv4-mapped address (::ffff:127.0.0.1) does not count: the cautious side is to require TLS.
 */
export function isLoopbackAddress(host: string): boolean {
  const family = isIP(host);
  return family === 4 ? LOOPBACK_V4.check(host, 'ipv4') : family === 6 ? LOOPBACK_V6.check(host, 'ipv6') : false;
}

/** Options of one attempt. */
export interface SendOptions {
  /**
   * Wall-clock deadline of the attempt, from the moment it asks the pool for a connection to the final
   * reply. When it passes, the attempt is aborted and its connection closed (freeing its pool slot),
   * whatever the downstream still trickles: nodemailer's socket timeout only notices silence.
   */
  readonly timeoutMs: number;
}

/** Bytes per read from a spilled body's file. */
const FILE_HIGH_WATER_MARK = 256 * 1024;

type SentInfo = SMTPConnection.SentMessageInfo;

/** A failure nodemailer reports for a connection that ended while an operation waited on it. */
function connectionClosed(): Error {
  return Object.assign(new Error('Connection closed unexpectedly'), { code: 'ECONNECTION' });
}

/** An attempt that waited on a pool a reload has since closed: temporary, and no fault of the downstream. */
function poolClosed(): Error {
  return new Error('Connection pool was closed');
}

/**
 * One SMTPConnection of a pool. Every operation on it (connect, login, send, reset) settles exactly once:
 * by its callback, or by the connection's 'error' or 'end' when those come first (SMTPConnection reports
 * some failures only as events, and forgets a send in flight when it is closed).
 */
class PooledConnection {
  /** Messages given to this connection: one that has had a message may have been dropped since. */
  messages = 0;
  closed = false;
  private settleCurrent: ((err: Error | null, value?: unknown) => void) | undefined;

  constructor(readonly connection: SMTPConnection, onClosed: (pooled: PooledConnection) => void) {
    connection.on('error', (err: Error) => this.settleCurrent?.(err));
    connection.once('end', () => {
      this.closed = true;
      this.settleCurrent?.(connectionClosed());
      onClosed(this);
    });
  }

  run<T>(start: (done: (err: Error | null | undefined, value?: T) => void) => void): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      if (this.closed) return reject(connectionClosed());
      let settled = false;
      const settle = (err: Error | null | undefined, value?: unknown): void => {
        if (settled) return;
        settled = true;
        if (this.settleCurrent === settle) this.settleCurrent = undefined;
        if (err) reject(err);
        else resolve(value as T);
      };
      this.settleCurrent = settle;
      start(settle);
    });
  }

  close(): void {
    this.connection.close();
  }
}

/** An attempt waiting for a connection: every slot of the pool is busy. */
interface Waiter {
  /** With a connection released to it, or with none: a slot was freed and is now counted for it. */
  resolve(pooled: PooledConnection | undefined): void;
  reject(err: Error): void;
}

/** One attempt's hold on the pool, so its deadline can end whatever the attempt is waiting on. */
interface AttemptHold {
  expired: boolean;
  waiter?: Waiter;
  connection?: PooledConnection;
}

export class DownstreamPool {
  private readonly options: SMTPConnection.Options;
  private readonly auth: { user: string; pass: string } | undefined;
  private readonly maxConnections: number;
  /** Connections that are open and free, the most recently used last (the least likely to be stale). */
  private readonly idle: PooledConnection[] = [];
  private readonly waiting: Waiter[] = [];
  /** Connections counted against maxConnections: connecting, idle or carrying a message. */
  private open = 0;
  private closing = false;

  constructor(ds: DownstreamConfig, settings: PoolSettings) {
    this.options = {
      host: ds.host,
      port: ds.port,
      secure: ds.tls === 'tls',
      // In auto mode a password is only sent over TLS, unless the downstream is on this machine (as Go's
      // net/smtp does): a server that stops offering STARTTLS must not get it in the clear.
      requireTLS: ds.tls === 'starttls' || (ds.tls === 'auto' && ds.user !== undefined && !isLoopbackAddress(ds.host)),
      ignoreTLS: ds.tls === 'none',
      tls: { rejectUnauthorized: ds.verifyTls, servername: ds.host },
      name: settings.hostname,
      connectionTimeout: settings.connectTimeoutMs,
      greetingTimeout: settings.connectTimeoutMs,
      socketTimeout: settings.socketTimeoutMs,
      logger: false,
    };
    this.auth = ds.user !== undefined ? { user: ds.user, pass: ds.pass ?? '' } : undefined;
    this.maxConnections = settings.maxConnections;
  }

  /** Sends the raw message unchanged with the given envelope, within the attempt's deadline; never rejects. */
  send(envelope: Envelope, raw: RawMessage, options: SendOptions): Promise<AttemptResult> {
    const hold: AttemptHold = { expired: false };
    return new Promise<AttemptResult>((resolve) => {
      // The deadline ends the attempt where it is: waiting for a slot, connecting or sending. Closing the
      // connection frees its slot for the next message; other deliveries in the pool carry on.
      const timer = setTimeout(() => {
        hold.expired = true;
        if (hold.waiter) this.dropWaiter(hold.waiter);
        hold.connection?.close();
        // The downstream may have accepted just as we gave up: as with a reply lost after the final dot,
        // that is a failed attempt (RFC 1047), logged as such.
        resolve({ ok: false, code: 'ETIMEDOUT', permanent: false, backoff: true, message: `no final reply within ${options.timeoutMs} ms (delivery.attempt_timeout_ms); the attempt was aborted` });
      }, options.timeoutMs);
      this.attempt(envelope, raw, hold).then(
        (result) => {
          clearTimeout(timer);
          if (!hold.expired) resolve(result);
        },
        (err: unknown) => {
          clearTimeout(timer);
          if (!hold.expired) resolve({ ok: false, ...classifyFailure(err) });
        },
      );
    });
  }

  /** Closes idle connections now and the others once their message is done; waiting attempts fail. */
  close(): void {
    this.closing = true;
    for (const pooled of this.idle.splice(0)) pooled.connection.quit();
    for (const waiter of this.waiting.splice(0)) waiter.reject(poolClosed());
  }

  private async attempt(envelope: Envelope, raw: RawMessage, hold: AttemptHold): Promise<AttemptResult> {
    const smtpEnvelope = toSmtpEnvelope(envelope);
    // A connection found dead before a byte of the message went out (a pooled connection the server
    // dropped while idle) is replaced once. Once bytes went out, a failure is ours to handle (failover,
    // never a silent resend).
    for (let tries = 0; ; tries++) {
      const pooled = await this.acquire(hold);
      const reused = pooled.messages++ > 0;
      const message = openMessage(raw);
      try {
        const info = await pooled.run<SentInfo>((done) => pooled.connection.send(smtpEnvelope, message, done));
        this.release(pooled);
        const response = String(info.response ?? '');
        const code = Number(/^\d{3}/.exec(response)?.[0] ?? 250);
        return { ok: true, responseCode: code, response: response.slice(0, 500), rejected: (info.rejected ?? []).map(String) };
      } catch (err) {
        const untouched = message.readableDidRead === false;
        message.destroy();
        if (hold.expired) throw err;
        if (tries === 0 && reused && untouched && isTransientError(err as never)) {
          pooled.close();
          continue;
        }
        this.afterFailure(pooled, err);
        throw err;
      } finally {
        if (hold.connection === pooled) hold.connection = undefined;
      }
    }
  }

  /** After a refused message the session is reset and the connection kept; after anything else it is closed. */
  private afterFailure(pooled: PooledConnection, err: unknown): void {
    const e = err as { code?: string; responseCode?: number };
    if ((e.code === 'EENVELOPE' || e.code === 'EMESSAGE') && e.responseCode !== 421 && !pooled.closed) {
      pooled.run((done) => pooled.connection.reset(done)).then(
        () => this.release(pooled),
        () => pooled.close(),
      );
      return;
    }
    pooled.close();
  }

  /** A free connection: an idle one, a new one in a free slot, or the next one released or freed. */
  private async acquire(hold: AttemptHold): Promise<PooledConnection> {
    if (this.closing) throw poolClosed();
    let pooled = this.idle.pop();
    if (pooled === undefined) {
      if (this.open < this.maxConnections) this.open++;
      else
        pooled = await new Promise<PooledConnection | undefined>((resolve, reject) => {
          hold.waiter = { resolve, reject };
          this.waiting.push(hold.waiter);
        });
      hold.waiter = undefined;
      if (pooled === undefined) {
        // A slot is counted for this attempt: it opens a connection in it, unless its time is up.
        if (hold.expired) {
          this.freeSlot();
          throw connectionClosed();
        }
        pooled = await this.connect(hold);
      }
    }
    hold.connection = pooled;
    if (hold.expired) {
      // The deadline passed while this connection was on its way: it goes back, unused.
      this.release(pooled);
      throw connectionClosed();
    }
    return pooled;
  }

  /** Opens and logs in a new connection; its slot is counted by the caller and freed when it ends. */
  private async connect(hold: AttemptHold): Promise<PooledConnection> {
    const pooled = new PooledConnection(new SMTPConnection(this.options), (closed) => this.forget(closed));
    hold.connection = pooled;
    try {
      await pooled.run((done) => pooled.connection.connect(done));
      if (this.auth && pooled.connection.allowsAuth) await pooled.run((done) => pooled.connection.login(this.auth, done));
      return pooled;
    } catch (err) {
      pooled.close();
      throw err;
    }
  }

  /** Hands a connection to the next waiting attempt, or keeps it for the next message. */
  private release(pooled: PooledConnection): void {
    if (pooled.closed) return;
    const waiter = this.waiting.shift();
    if (waiter) return waiter.resolve(pooled);
    if (this.closing) return pooled.connection.quit();
    this.idle.push(pooled);
  }

  /** A connection ended: its slot is free. */
  private forget(pooled: PooledConnection): void {
    const index = this.idle.indexOf(pooled);
    if (index !== -1) this.idle.splice(index, 1);
    this.freeSlot();
  }

  /** Gives a free slot to the next waiting attempt, which opens a connection in it, or frees it. */
  private freeSlot(): void {
    const waiter = this.waiting.shift();
    if (waiter) waiter.resolve(undefined);
    else this.open--;
  }

  private dropWaiter(waiter: Waiter): void {
    const index = this.waiting.indexOf(waiter);
    if (index !== -1) this.waiting.splice(index, 1);
  }
}

/** The bytes of one try, read from the start. */
function openMessage(raw: RawMessage): Readable {
  if (Buffer.isBuffer(raw)) return stuffingSource(raw);
  if ('path' in raw) return stuffingSource(createReadStream(raw.path, { highWaterMark: FILE_HIGH_WATER_MARK }));
  return stuffingSource(raw.stream());
}

/**
 * The envelope as SMTPConnection takes it. The addresses are as smtp-server parsed them from the client,
 * passed on as they are, with two things nodemailer's Mailer did that a relay still wants: a recipient
 * named twice gets one RCPT TO, and an internationalized domain behind an ASCII local part is sent as its
 * A-label (`safe@xn--jgeva-dua.ee`), which any downstream takes, SMTPUTF8 or not.
 */
function toSmtpEnvelope(envelope: Envelope): SMTPConnection.Envelope {
  return {
    from: smtpAddress(envelope.from),
    to: [...new Set(envelope.to.map(smtpAddress))],
    use8BitMime: envelope.use8BitMime,
    size: envelope.size,
  };
}

const NON_ASCII = /[^\x00-\x7f]/;

function smtpAddress(address: string): string {
  if (!NON_ASCII.test(address)) return address;
  const at = address.lastIndexOf('@');
  // A UTF-8 local part needs SMTPUTF8 anyway, and the domain is kept in UTF-8 beside it.
  if (at < 0 || NON_ASCII.test(address.slice(0, at))) return address;
  const domain = domainToASCII(address.slice(at + 1));
  return domain ? `${address.slice(0, at)}@${domain}` : address;
}
