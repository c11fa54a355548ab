// The inbound SMTP server: one handler per protocol verb (onAuth, onMailFrom, onData), as RFC 5321
// reads. Every transaction takes the current Runtime when its DATA starts and keeps it to the end.
import { randomBytes } from 'node:crypto';
import type { SMTPServer, SMTPServerSession, SMTPServerDataStream } from 'smtp-server';
import { SmtpMuxError } from '../errors';
import { MessageBody } from '../message/body';
import { summarize } from '../message/summary';
import type { Logger } from '../observe/logger';
import { routeMessage } from '../route';
import type { Runtime } from '../runtime';
import { CatalogueSMTPServer } from './replies';

export interface InboundDeps {
  /** The Runtime new transactions use; it changes on reload. */
  current(): Runtime;
  readonly logger: Logger;
  /** True once shutdown began: new transactions are turned away with 421. */
  closing(): boolean;
  /** Where large bodies spill (default: the OS temp dir). */
  readonly tmpDir?: string;
}

/** How long a failed login waits for its 535. */
export const AUTH_FAILURE_DELAY_MS = 1000;

/** Random once per process, so ids from two instances (or a restart within a millisecond) differ. */
const INSTANCE = randomBytes(3).toString('hex');
let sequence = 0;

/** A short id, unique per process and sortable by time, with no per-message crypto call. */
export function newMessageId(): string {
  sequence = (sequence + 1) % 46656;
  return `${Date.now().toString(36)}${sequence.toString(36).padStart(3, '0')}${INSTANCE}`.toUpperCase();
}

export function createInboundServer(deps: InboundDeps, initial: Runtime): SMTPServer {
  const { logger } = deps;
  const server: SMTPServer = new CatalogueSMTPServer({
    name: initial.config.hostname,
    banner: 'SMTP Mux',
    size: initial.config.maxMessageSize,
    authMethods: ['PLAIN', 'LOGIN'],
    authOptional: false,
    authRequiredMessage: new SmtpMuxError('SMTPMUX_AUTH_REQUIRED').message,
    // We check plaintext AUTH ourselves (onAuth) so allow_insecure_auth follows a reload.
    allowInsecureAuth: true,
    hideSTARTTLS: true,
    hideENHANCEDSTATUSCODES: false,
    disableReverseLookup: true,
    logger: false,

    onAuth(auth, session, callback) {
      const runtime = deps.current();
      const username = auth.username ?? '';
      if (!session.secure && !runtime.config.allowInsecureAuth) {
        return callback(new SmtpMuxError('SMTPMUX_AUTH_INSECURE'));
      }
      const user = runtime.authenticate(username, auth.password ?? '');
      if (!user) {
        logger.warn({ login: username.slice(0, 200), remote: session.remoteAddress, method: auth.method }, 'authentication failed');
        // A pause before the refusal makes guessing passwords slow, and smtp-server drops a connection
        // after ten unauthenticated commands, so one connection cannot try many.
        setTimeout(() => callback(new SmtpMuxError('SMTPMUX_AUTH_FAILED')), AUTH_FAILURE_DELAY_MS);
        return;
      }
      callback(null, { user: user.email });
    },

    onMailFrom(_address, _session, callback) {
      if (deps.closing()) return callback(new SmtpMuxError('SMTPMUX_SHUTTING_DOWN'));
      callback();
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
    let body: MessageBody | undefined;
    try {
      const limit = runtime.config.maxMessageSize;
      try {
        body = await MessageBody.receive(stream, { maxSize: limit, tmpDir: deps.tmpDir });
      } catch (err) {
        // Mostly a client that went away mid-DATA: worth a line, not an alarm.
        logger.warn({ msgId: id, err: (err as Error).message }, 'message could not be received');
        throw new SmtpMuxError('SMTPMUX_RECEIVE_FAILED', `message id ${id}`);
      }
      // Our own count, against this transaction's Runtime: smtp-server's flag may use a limit from before a reload.
      if (body.exceeds(limit)) {
        logger.warn({ msgId: id, size: body.size, limit }, 'message too big');
        throw new SmtpMuxError('SMTPMUX_MESSAGE_TOO_BIG', `limit ${limit} bytes`);
      }
      // (A message whose DATA began before shutdown is in flight: it is delivered, not turned away.)
      const user = runtime.user(String(session.user ?? ''));
      if (!user) throw new SmtpMuxError('SMTPMUX_USER_GONE');

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
      const routed = await routeMessage(runtime, user, message, envelope, body, logger);
      if (routed.error) {
        throw routed.error.withDetail(`message id ${id}`);
      }
      return `2.0.0 Delivered via ${routed.downstream} (message id ${id})`;
    } finally {
      await body?.dispose();
      release();
    }
  }

  return server;
}
