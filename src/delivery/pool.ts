// One downstream SMTP server as a pooled nodemailer transport, reused across messages. A pool is
// identified by its connection settings (`poolKey`), so a reload that leaves a downstream's
// settings alone keeps its open connections.
import { createHash } from 'node:crypto';
import nodemailer from 'nodemailer';
import type { DownstreamConfig } from '../config/load';
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

export type AttemptResult =
  | { readonly ok: true; readonly responseCode: number; readonly response: string; readonly rejected: readonly string[] }
  | ({ readonly ok: false } & AttemptFailure);

/** A stable identity for a downstream's connection settings; credentials enter only as a hash. */
export function poolKey(ds: DownstreamConfig, settings: PoolSettings): string {
  const secret = createHash('sha256').update(`${ds.user ?? ''}\0${ds.pass ?? ''}`).digest('hex').slice(0, 16);
  return JSON.stringify([ds.host, ds.port, ds.tls, ds.verifyTls, secret, settings.connectTimeoutMs, settings.socketTimeoutMs, settings.maxConnections, settings.hostname ?? '']);
}

function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\./.test(host);
}

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
      requireTLS: ds.tls === 'starttls' || (ds.tls === 'auto' && ds.user !== undefined && !isLoopback(ds.host)),
      ignoreTLS: ds.tls === 'none',
      tls: { rejectUnauthorized: ds.verifyTls, servername: ds.host },
      auth: ds.user !== undefined ? { user: ds.user, pass: ds.pass } : undefined,
      name: settings.hostname,
      maxConnections: settings.maxConnections,
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
  }

  /** Sends the raw message unchanged with the given envelope; never rejects. */
  async send(envelope: Envelope, raw: Buffer | { readonly path: string }): Promise<AttemptResult> {
    try {
      const info = await this.transport.sendMail({
        // use8BitMime and size reach MAIL FROM (BODY=8BITMIME, SIZE=) though nodemailer's type omits them.
        envelope: { from: envelope.from, to: [...envelope.to], use8BitMime: envelope.use8BitMime, size: envelope.size } as never,
        raw: raw as Buffer | { path: string },
      });
      const response = String(info.response ?? '');
      const code = Number(/^\d{3}/.exec(response)?.[0] ?? 250);
      return { ok: true, responseCode: code, response: response.slice(0, 500), rejected: (info.rejected ?? []).map(String) };
    } catch (err) {
      return { ok: false, ...classifyFailure(err) };
    }
  }

  close(): void {
    this.transport.close();
  }
}
