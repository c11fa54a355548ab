// One downstream SMTP server as a pooled nodemailer transport, reused across messages. A pool is
// identified by its connection settings (`poolKey`), so a reload that leaves a downstream's
// settings alone keeps its open connections.
import { createHash } from 'node:crypto';
import { BlockList, isIP } from 'node:net';
import type { Readable } from 'node:stream';
import nodemailer from 'nodemailer';
import type { DownstreamConfig } from '../config/load';
import { useFastStuffing } from '../message/dot-stuffing';
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
 * The bytes of one attempt: the body as received (a Buffer, or a spilled body's file, which nodemailer
 * opens afresh on a requeue), or a stream built for this attempt (a From rewrite of a spilled body).
 */
export type RawMessage = Buffer | { readonly path: string } | Readable;

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

/** What nodemailer is told the Message-ID is: it only names the message in nodemailer's own logs. */
const RELAY_MESSAGE_ID = '<relayed@smtpmux>';

export class DownstreamPool {
  private readonly transport;

  constructor(ds: DownstreamConfig, settings: PoolSettings) {
    this.transport = nodemailer.createTransport({
      pool: true,
      host: ds.host,
      port: ds.port,
      secure: ds.tls === 'tls',
      // In auto mode a password is only sent over TLS, unless the downstream is on this machine (as Go's
      // net/smtp does): a server that stops offering STARTTLS must not get it in the clear.
      requireTLS: ds.tls === 'starttls' || (ds.tls === 'auto' && ds.user !== undefined && !isLoopbackAddress(ds.host)),
      ignoreTLS: ds.tls === 'none',
      tls: { rejectUnauthorized: ds.verifyTls, servername: ds.host },
      auth: ds.user !== undefined ? { user: ds.user, pass: ds.pass } : undefined,
      name: settings.hostname,
      maxConnections: settings.maxConnections,
      // nodemailer's default closes a pooled connection after 100 messages, and its pool then waits
      // 100 ms before it sends the next queued message: one message in a hundred took 100 ms more. A
      // downstream that wants fewer messages per connection says so (421, or closing), which the pool
      // handles like any dropped connection.
      maxMessages: Infinity,
      // nodemailer requeues a message only when its connection was found dead before a byte of it was
      // sent (a pooled connection the server dropped while idle); once bytes went out, the failure is
      // ours to handle (failover, never a silent resend). One retry on a fresh connection is enough.
      maxRequeues: 1,
      connectionTimeout: settings.connectTimeoutMs,
      greetingTimeout: settings.connectTimeoutMs,
      socketTimeout: settings.socketTimeoutMs,
      // File access is how a spilled body is read afresh on a requeue ({ path } below); the only paths
      // nodemailer ever sees are our own temp files, never anything a client or a selector supplied.
      disableFileAccess: false,
      disableUrlAccess: true,
      logger: false,
    });
    // nodemailer with a fast path for dot-stuffing the body on its way out (see dot-stuffing.ts).
    useFastStuffing(this.transport);
  }

  /** Sends the raw message unchanged with the given envelope, within the attempt's deadline; never rejects. */
  async send(envelope: Envelope, raw: RawMessage, options: SendOptions): Promise<AttemptResult> {
    const deadline = new AbortController();
    // nodemailer closes the connection an aborted message holds (or drops it from the queue), so the
    // pool slot is free for the next message; other deliveries in the pool carry on.
    const timer = setTimeout(() => deadline.abort(), options.timeoutMs);
    try {
      const info = await this.transport.sendMail({
        // use8BitMime and size reach MAIL FROM (BODY=8BITMIME, SIZE=) though nodemailer's type omits them.
        envelope: { from: envelope.from, to: [...envelope.to], use8BitMime: envelope.use8BitMime, size: envelope.size } as never,
        raw: raw as Buffer | { path: string } | Readable,
        // nodemailer otherwise makes a random Message-ID per message for its own bookkeeping (a raw
        // message is sent as it is; this value never reaches the wire): about 3% of a small message's CPU.
        messageId: RELAY_MESSAGE_ID,
        signal: deadline.signal,
      });
      const response = String(info.response ?? '');
      const code = Number(/^\d{3}/.exec(response)?.[0] ?? 250);
      return { ok: true, responseCode: code, response: response.slice(0, 500), rejected: (info.rejected ?? []).map(String) };
    } catch (err) {
      if (deadline.signal.aborted) {
        // The downstream may have accepted just as we gave up: as with a reply lost after the final
        // dot, that is a failed attempt (RFC 1047), logged as such.
        return { ok: false, code: 'ETIMEDOUT', permanent: false, backoff: true, message: `no final reply within ${options.timeoutMs} ms (delivery.attempt_timeout_ms); the attempt was aborted` };
      }
      return { ok: false, ...classifyFailure(err) };
    } finally {
      clearTimeout(timer);
    }
  }

  close(): void {
    this.transport.close();
  }
}
