// The inbound SMTP server: one handler per protocol verb (onConnect, onAuth, onMailFrom, onRcptTo,
// onData, onClose), as RFC 5321 reads. Every transaction takes the current Runtime when its DATA starts
// and keeps it to the end. The STARTTLS listener and the implicit-TLS one are two servers with the same
// handlers and one ConnectionGuard.
import { randomBytes } from 'node:crypto';
import type { EventEmitter } from 'node:events';
import type { SMTPServer, SMTPServerOptions, SMTPServerSession, SMTPServerDataStream } from 'smtp-server';
import { loginHash, type LoginPenalties } from '../auth/penalty';
import { INBOUND_TLS_MIN_VERSION } from '../config/load';
import { SmtpMuxError, type ErrorCode } from '../errors';
import { MessageBody, type BodyMemory } from '../message/body';
import { summarize } from '../message/summary';
import type { Logger } from '../observe/logger';
import type { Metrics } from '../observe/metrics';
import { routeMessage } from '../route';
import type { Runtime } from '../runtime';
import { clientNetwork } from './client-network';
import { ConnectionGuard } from './guard';
import { FastDataSMTPServer } from './fast-data';
import { isQueueable, type Spool } from '../spool/spool';

export interface InboundDeps {
  /** The Runtime new transactions use; it changes on reload. */
  current(): Runtime;
  readonly logger: Logger;
  /** Where messages and their timings are counted (the App's own registry). */
  readonly metrics: Metrics;
  /** True once shutdown began: new transactions are turned away with 421. */
  closing(): boolean;
  /** Where large bodies spill (default: the OS temp dir). */
  readonly tmpDir?: string;
  /**
   * Login penalties, shared by every listener so that one client's attempts are decided one at a time
   * (their counters live in the state store, shared by every instance when the store is shared).
   */
  readonly penalties: LoginPenalties;
  /** The open connections of every listener. */
  readonly guard: ConnectionGuard;
  /**
   * Where security events go, for metrics: 'auth_failure' ({ reason, remote }), 'auth_success' ({ remote }),
   * 'connection_refused' ({ reason, remote }), 'connection_closed' ({ reason: 'SMTPMUX_AUTH_TIMEOUT', remote }),
   * with reason an error code such as SMTPMUX_AUTH_FAILED.
   */
  readonly events?: EventEmitter;
  /** The durable spool, when the config has one: takes a queueing user's message no downstream took. */
  spool?(): Spool | undefined;
  /** Large bodies held in memory together, by every listener of the process, past which they spill to disk. */
  readonly bodyMemory: BodyMemory;
}

export interface ListenerOptions {
  /** Implicit TLS (port 465 style) instead of STARTTLS. */
  readonly implicitTls?: boolean;
}

/** Failed AUTHs one connection may make: the last is answered 421 and the connection closed. */
export const AUTH_FAILURES_PER_CONNECTION = 3;

/** Random once per process, so ids from two instances (or a restart within a millisecond) differ. */
const INSTANCE = randomBytes(3).toString('hex');
let sequence = 0;

/** A short id, unique per process and sortable by time, with no per-message crypto call. */
export function newMessageId(): string {
  sequence = (sequence + 1) % 46656;
  return `${Date.now().toString(36)}${sequence.toString(36).padStart(3, '0')}${INSTANCE}`.toUpperCase();
}

/** smtp-server's TLS options for our certificate: TLS 1.2 and newer only. */
export function tlsOptions(material: { cert: string; key: string }): Pick<SMTPServerOptions, 'cert' | 'key' | 'minVersion'> {
  return { cert: material.cert, key: material.key, minVersion: INBOUND_TLS_MIN_VERSION };
}

const sleepUntil = (at: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, Math.max(0, at - Date.now())));

/** The SIZE= a client declared in MAIL FROM, if any. */
function declaredSize(session: SMTPServerSession): number | undefined {
  const args = session.envelope.mailFrom ? session.envelope.mailFrom.args : false;
  const size = Number(args ? (args as Record<string, string | undefined>).SIZE : undefined);
  return Number.isFinite(size) && size > 0 ? size : undefined;
}

export function createInboundServer(deps: InboundDeps, initial: Runtime, listener: ListenerOptions = {}): SMTPServer {
  const { logger, guard, metrics } = deps;
  const { penalties } = deps;
  const tls = initial.config.tls;
  const refuse = (code: ErrorCode, session: SMTPServerSession, event: string, callback: (err?: Error | null) => void): void => {
    deps.events?.emit(event, { reason: code, remote: session.remoteAddress });
    callback(new SmtpMuxError(code));
  };

  // smtp-server with our replies and a fast path for un-dot-stuffing large bodies (see src/smtp/fast-data.ts).
  const server: SMTPServer = new FastDataSMTPServer({
    name: initial.config.hostname,
    banner: 'SMTP Mux',
    size: initial.config.maxMessageSize,
    authMethods: ['PLAIN', 'LOGIN'],
    authOptional: false,
    authRequiredMessage: new SmtpMuxError('SMTPMUX_AUTH_REQUIRED').message,
    // We check plaintext AUTH ourselves (onAuth) so allow_insecure_auth follows a reload.
    allowInsecureAuth: true,
    // Without our own certificate smtp-server would offer STARTTLS with its built-in one: never.
    ...(tls ? { ...tlsOptions(tls.material), hideSTARTTLS: false } : { hideSTARTTLS: true, disabledCommands: ['STARTTLS'] }),
    secure: Boolean(listener.implicitTls && tls),
    // true: every peer; a list: PROXY headers are read from these balancers only, the rest are clients.
    useProxy: typeof initial.config.proxyProtocol === 'boolean' ? initial.config.proxyProtocol : [...initial.config.proxyProtocol],
    hideENHANCEDSTATUSCODES: false,
    disableReverseLookup: true,
    logger: false,

    onConnect(session, callback) {
      const { config } = deps.current();
      const connection = [...server.connections].find((c) => c.session === session);
      if (!connection) return callback(new SmtpMuxError('SMTPMUX_INTERNAL'));
      const admitted = guard.admit(session, connection, {
        maxConnections: config.maxConnections,
        maxPerAddress: config.maxConnectionsPerAddress,
        authTimeoutMs: config.authTimeoutMs,
      });
      if (!admitted.ok) {
        logger.warn({ remote: session.remoteAddress, open: guard.size, fromAddress: guard.from(session.remoteAddress), code: admitted.code }, 'connection refused');
        return refuse(admitted.code, session, 'connection_refused', callback);
      }
      penalties.lockedOut(clientNetwork(session.remoteAddress)).then(
        (locked) => {
          if (!locked) return callback();
          logger.warn({ remote: session.remoteAddress }, 'connection refused: too many failed logins from this address');
          refuse('SMTPMUX_ADDRESS_LOCKED', session, 'connection_refused', callback);
        },
        // The store is down: admit, the per-connection limit still holds.
        (err: Error) => {
          logger.error({ err: err.message }, 'login penalties unavailable');
          callback();
        },
      );
    },

    onAuth(auth, session, callback) {
      authenticate(auth.username ?? '', auth.password ?? '', auth.method, session).then(
        (user) => callback(null, { user }),
        (err: Error) => {
          if (err instanceof SmtpMuxError) return callback(err);
          logger.error({ err: String(err?.stack ?? err) }, 'unexpected error during login');
          callback(new SmtpMuxError('SMTPMUX_INTERNAL'));
        },
      );
    },

    onMailFrom(_address, session, callback) {
      if (deps.closing()) return callback(new SmtpMuxError('SMTPMUX_SHUTTING_DOWN'));
      if (!loginHolds(session)) return callback(new SmtpMuxError('SMTPMUX_LOGIN_CHANGED'));
      callback();
    },

    onRcptTo(address, session, callback) {
      const max = deps.current().config.maxRecipients;
      const rcpts = session.envelope.rcptTo;
      // smtp-server replaces a repeated recipient instead of adding it: that one does not count.
      const repeated = rcpts.some((r) => r.address.toLowerCase() === address.address.toLowerCase());
      if (rcpts.length >= max && !repeated) return callback(new SmtpMuxError('SMTPMUX_TOO_MANY_RECIPIENTS', `at most ${max}`));
      callback();
    },

    onClose(session) {
      guard.closed(session);
    },

    onData(stream, session, callback) {
      handleData(stream, session).then(
        (text) => callback(null, text),
        (err: Error) => {
          if (err instanceof SmtpMuxError) return callback(err);
          // Never a raw exception text as the reply, nor a reply code smtp-server would guess.
          logger.error({ err: String(err?.stack ?? err) }, 'unexpected error while handling a message');
          callback(new SmtpMuxError('SMTPMUX_INTERNAL'));
        },
      );
    },
  });

  async function handleData(stream: SMTPServerDataStream, session: SMTPServerSession): Promise<string> {
    const runtime = deps.current();
    const release = runtime.acquire();
    const id = newMessageId();
    // The login is a configured user's (onAuth set it from the config), so it is a bounded label.
    const login = String(session.user ?? '');
    const started = performance.now();
    let dataEnded: number | undefined;
    const seconds = (): number => (performance.now() - (dataEnded ?? started)) / 1000;
    let body: MessageBody | undefined;
    try {
      const limit = runtime.config.maxMessageSize;
      try {
        body = await MessageBody.receive(stream, { maxSize: limit, tmpDir: deps.tmpDir, memory: deps.bodyMemory, declaredSize: declaredSize(session) });
      } catch (err) {
        // Mostly a client that went away mid-DATA: worth a line, not an alarm.
        logger.warn({ msgId: id, err: (err as Error).message }, 'message could not be received');
        throw new SmtpMuxError('SMTPMUX_RECEIVE_FAILED', `message id ${id}`);
      }
      dataEnded = performance.now();
      // Our own count, against this transaction's Runtime: smtp-server's flag may use a limit from before a reload.
      if (body.exceeds(limit)) {
        logger.warn({ msgId: id, size: body.size, limit }, 'message too big');
        throw new SmtpMuxError('SMTPMUX_MESSAGE_TOO_BIG', `limit ${limit} bytes`);
      }
      // (A message whose DATA began before shutdown is in flight: it is delivered, not turned away.)
      const user = runtime.user(String(session.user ?? ''));
      if (!user) throw new SmtpMuxError('SMTPMUX_USER_GONE');
      // A password rotated since this session logged in: the old password no longer sends anything.
      if (guard.login(session)?.passwordId !== user.password.id) throw new SmtpMuxError('SMTPMUX_LOGIN_CHANGED');

      const envelope = {
        from: session.envelope.mailFrom ? session.envelope.mailFrom.address : '',
        to: session.envelope.rcptTo.map((rcpt) => rcpt.address),
        use8BitMime: String(session.envelope.bodyType ?? '').toLowerCase() === '8bitmime',
        size: body.size,
      };
      const message = summarize(
        { id, user: user.email, from: envelope.from, to: envelope.to, size: body.size, clientAddress: session.remoteAddress },
        body.headerBlock,
      );
      const routed = await routeMessage(runtime, user, message, envelope, body, logger, metrics);
      if (routed.error) {
        const spool = deps.spool?.();
        if (spool && user.queue && isQueueable(routed.error)) {
          const queued = await spool
            .keep({ id, user: user.email, envelope, clientAddress: session.remoteAddress, queue: user.queue, body, lastError: routed.error.message })
            .catch((err: SmtpMuxError) => Promise.reject(err.withDetail(`message id ${id}`)));
          metrics.message(login, 'queued', seconds());
          return `2.0.0 Queued as ${queued}`;
        }
        throw routed.error.withDetail(`message id ${id}`);
      }
      metrics.message(login, 'delivered', seconds());
      return `2.0.0 Delivered via ${routed.downstream} (message id ${id})`;
    } catch (err) {
      // What onData answers: an SmtpMuxError's own code, anything else 451.
      const reply = err instanceof SmtpMuxError ? err.responseCode : 451;
      metrics.message(login, reply >= 500 ? 'rejected' : 'deferred', seconds());
      throw err;
    } finally {
      await body?.dispose();
      release();
    }
  }

  /** True while the user this session logged in as exists with the same password. */
  function loginHolds(session: SMTPServerSession): boolean {
    const login = guard.login(session);
    return login !== undefined && deps.current().user(login.user)?.password.id === login.passwordId;
  }

  /**
   * One AUTH: refused on plaintext unless allowed, refused when the address is locked out, else the
   * password is checked and the answer waits out the penalty (success and failure alike while penalised).
   * Resolves with the configured email; rejects with the SmtpMuxError to answer.
   */
  async function authenticate(username: string, password: string, method: string, session: SMTPServerSession): Promise<string> {
    const started = Date.now();
    const runtime = deps.current();
    const { config } = runtime;
    const remote = session.remoteAddress;
    if (!session.secure && !config.allowInsecureAuth) {
      deps.events?.emit('auth_failure', { reason: 'SMTPMUX_AUTH_INSECURE', remote });
      throw new SmtpMuxError('SMTPMUX_AUTH_INSECURE');
    }
    // Penalties count per client network (an IPv6 /64), as the connection limits do.
    const network = clientNetwork(remote);
    const { attempt, user } = await penalties.oneAtATime(network, async () => {
      const verdict = await penalties.begin(network, username);
      if (verdict.kind === 'locked') return { attempt: verdict, user: undefined };
      const found = await runtime.authenticate(username, password);
      if (found) await penalties.succeeded(network);
      else await penalties.failed(username);
      return { attempt: verdict, user: found };
    });
    if (attempt.kind === 'locked') {
      logger.warn({ remote, method }, 'login refused: too many failed logins from this address');
      deps.events?.emit('auth_failure', { reason: 'SMTPMUX_AUTH_LOCKED', remote });
      // A refusal counts toward the connection's three: it may not keep asking (each ask is a store write).
      const failures = guard.failedLogin(session);
      throw new SmtpMuxError(failures >= AUTH_FAILURES_PER_CONNECTION ? 'SMTPMUX_AUTH_TOO_MANY_FAILURES' : 'SMTPMUX_AUTH_LOCKED');
    }
    if (user) {
      await sleepUntil(started + attempt.waitMs);
      guard.loggedIn(session, { user: user.email.toLowerCase(), passwordId: user.password.id });
      deps.events?.emit('auth_success', { remote });
      return user.email;
    }
    const failures = guard.failedLogin(session);
    // A login that is not configured is logged as a short hash: it may be a password typed in the wrong field.
    const known = runtime.user(username);
    logger.warn(
      { ...(known ? { login: known.email } : { loginHash: loginHash(username) }), remote, method, waitMs: attempt.waitMs || undefined },
      'authentication failed',
    );
    deps.events?.emit('auth_failure', { reason: 'SMTPMUX_AUTH_FAILED', remote });
    await sleepUntil(started + Math.max(attempt.waitMs, config.loginPenalty.failureDelayMs));
    throw new SmtpMuxError(failures >= AUTH_FAILURES_PER_CONNECTION ? 'SMTPMUX_AUTH_TOO_MANY_FAILURES' : 'SMTPMUX_AUTH_FAILED');
  }

  return server;
}
