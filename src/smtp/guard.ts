// The connections of every inbound listener (STARTTLS and implicit TLS share it): how many are open
// overall and per client address, how long one may stay without logging in, and who each one logged in
// as, so that a reload which changes or removes a user ends that user's sessions. "Per address" means
// per client network (an IPv4 address or an IPv6 /64, see client-network.ts).
import type { SMTPServerSession } from 'smtp-server';
import type { SMTPConnection } from 'smtp-server/lib/smtp-connection';
import { SmtpMuxError, type ErrorCode } from '../errors';
import { clientNetwork } from './client-network';

export interface Login {
  /** The configured email (lower case), never the string the client typed. */
  readonly user: string;
  /** The stored password's fingerprint at login: a rotation changes it. */
  readonly passwordId: string;
}

interface Tracked {
  /** The client network it counts against (clientNetwork of the remote address). */
  readonly network: string;
  readonly connection: SMTPConnection;
  readonly authTimer?: NodeJS.Timeout;
  login?: Login;
  failedLogins: number;
}

export type Admission = { readonly ok: true } | { readonly ok: false; readonly code: ErrorCode };

export class ConnectionGuard {
  private readonly sessions = new Map<string, Tracked>();
  private readonly perAddress = new Map<string, number>();

  /** `onAuthTimeout` hears of each connection closed for not logging in (for a log line and metrics). */
  constructor(private readonly onAuthTimeout: (address: string) => void = () => undefined) {}

  get size(): number {
    return this.sessions.size;
  }

  /** How many connections are open from this address's client network. */
  from(address: string): number {
    return this.perAddress.get(clientNetwork(address)) ?? 0;
  }

  /**
   * Admits a connection within the limits, or says which limit it breaks. An admitted connection that
   * has not logged in `authTimeoutMs` later is closed with 421.
   */
  admit(session: SMTPServerSession, connection: SMTPConnection, limits: { maxConnections: number; maxPerAddress: number; authTimeoutMs: number }): Admission {
    const network = clientNetwork(session.remoteAddress);
    if (this.sessions.size >= limits.maxConnections) return { ok: false, code: 'SMTPMUX_TOO_MANY_CONNECTIONS' };
    if ((this.perAddress.get(network) ?? 0) >= limits.maxPerAddress) return { ok: false, code: 'SMTPMUX_TOO_MANY_CONNECTIONS_FROM_ADDRESS' };
    const authTimer = setTimeout(() => {
      const tracked = this.sessions.get(session.id);
      if (!tracked || tracked.login) return;
      connection.send(421, new SmtpMuxError('SMTPMUX_AUTH_TIMEOUT').message);
      this.onAuthTimeout(session.remoteAddress);
    }, limits.authTimeoutMs);
    authTimer.unref();
    this.sessions.set(session.id, { network, connection, authTimer, failedLogins: 0 });
    this.perAddress.set(network, (this.perAddress.get(network) ?? 0) + 1);
    return { ok: true };
  }

  loggedIn(session: SMTPServerSession, login: Login): void {
    const tracked = this.sessions.get(session.id);
    if (!tracked) return;
    clearTimeout(tracked.authTimer);
    tracked.login = login;
  }

  login(session: SMTPServerSession): Login | undefined {
    return this.sessions.get(session.id)?.login;
  }

  /** Counts a failed AUTH on this connection and returns how many there were. */
  failedLogin(session: SMTPServerSession): number {
    const tracked = this.sessions.get(session.id);
    if (!tracked) return 1;
    return ++tracked.failedLogins;
  }

  closed(session: SMTPServerSession): void {
    const tracked = this.sessions.get(session.id);
    if (!tracked) return;
    clearTimeout(tracked.authTimer);
    this.sessions.delete(session.id);
    const left = (this.perAddress.get(tracked.network) ?? 0) - 1;
    if (left > 0) this.perAddress.set(tracked.network, left);
    else this.perAddress.delete(tracked.network);
  }

  /**
   * Ends the sessions whose login no longer holds (the user was removed or their password changed),
   * except those inside a transaction: those are refused when their message arrives (DATA checks the
   * login again). Returns how many were closed.
   */
  endStale(stillValid: (login: Login) => boolean): number {
    let ended = 0;
    for (const tracked of this.sessions.values()) {
      if (!tracked.login || stillValid(tracked.login)) continue;
      if (tracked.connection.session.envelope?.mailFrom) continue;
      tracked.connection.send(421, new SmtpMuxError('SMTPMUX_LOGIN_CHANGED').message);
      ended++;
    }
    return ended;
  }
}
