// Turns a nodemailer failure into the facts we act on: temporary or permanent, with code and reply.
// Only a refusal of the message itself is permanent: a 5xx to MAIL FROM, RCPT TO or DATA (nodemailer's
// EENVELOPE / EMESSAGE; 503 excepted, as its isPermanentResponseCode says). A 5xx in the greeting, to
// EHLO or to AUTH says something about the downstream (an IP block, a policy, our login), not about the
// message: it is a temporary failure of that downstream, so the message fails over or is deferred, as
// Postfix defers it, instead of bouncing. A quota reply (5.4.5) is not permanent either.
import { isPermanentResponseCode, type NodemailerError } from 'nodemailer/lib/errors';

export interface AttemptFailure {
  readonly code: string;
  readonly responseCode?: number;
  readonly response?: string;
  readonly permanent: boolean;
  /**
   * A back-off signal: the downstream, not the message, is the problem for now (connection refused or
   * timed out, 421, 454, a 4.7.x throttling reply, a quota reply, our login refused, a refusal before the
   * message). A downstream with a `cooldown` is not contacted for a while after one.
   */
  readonly backoff: boolean;
  readonly message: string;
}

/** Failures in the message's own transaction: only these can refuse the message permanently. */
const MESSAGE_CODES = new Set(['EENVELOPE', 'EMESSAGE']);

/** Failures that say the downstream cannot be used now, whatever the message. */
const BACKOFF_CODES = new Set(['ECONNECTION', 'ETIMEDOUT', 'ESOCKET', 'EDNS', 'EAUTH', 'ENOAUTH', 'ETLS', 'EREQUIRETLS', 'EPROTOCOL']);

/** An over-quota or throttling reply (Gmail's 550 5.4.5, SES's "Daily message quota exceeded"). */
const QUOTA_REPLY = /\b5\.4\.5\b|quota|throttl|sending rate|rate limit/i;

export function classifyFailure(err: unknown): AttemptFailure {
  const e = (err ?? {}) as NodemailerError;
  const code = typeof e.code === 'string' ? e.code : 'EUNKNOWN';
  const responseCode = typeof e.responseCode === 'number' ? e.responseCode : undefined;
  const response = typeof e.response === 'string' ? e.response.slice(0, 500) : undefined;
  const quota = response !== undefined && QUOTA_REPLY.test(response);
  const backoff =
    BACKOFF_CODES.has(code) || responseCode === 421 || responseCode === 454 || quota || (response !== undefined && /^4\d\d[ -]4\.7\.\d{1,3}\b/.test(response));
  // An over-quota reply is about the downstream's account, not the message: another one may take it.
  const permanent = responseCode !== undefined && MESSAGE_CODES.has(code) && isPermanentResponseCode(responseCode) && !quota;
  return { code, responseCode, response, permanent, backoff, message: oneLine(String(e.message ?? err)) };
}

function oneLine(text: string): string {
  return text.replace(/\s+/g, ' ').trim().slice(0, 300);
}
