// Turns a nodemailer failure into the facts we act on: temporary or permanent, with code and reply.
// Only a refusal of the message itself is permanent: a 5xx to MAIL FROM, RCPT TO or DATA (nodemailer's
// EENVELOPE / EMESSAGE; 503 excepted, as its isPermanentResponseCode says). A 5xx in the greeting, to
// EHLO or to AUTH says something about the downstream (an IP block, a policy, our login), not about the
// message: it is a temporary failure of that downstream, so the message fails over or is deferred, as
// Postfix defers it, instead of bouncing.
import { isPermanentResponseCode, type NodemailerError } from 'nodemailer/lib/errors';

export interface AttemptFailure {
  readonly code: string;
  readonly responseCode?: number;
  readonly response?: string;
  readonly permanent: boolean;
  readonly message: string;
}

/** Failures in the message's own transaction: only these can refuse the message permanently. */
const MESSAGE_CODES = new Set(['EENVELOPE', 'EMESSAGE']);

export function classifyFailure(err: unknown): AttemptFailure {
  const e = (err ?? {}) as NodemailerError;
  const code = typeof e.code === 'string' ? e.code : 'EUNKNOWN';
  const responseCode = typeof e.responseCode === 'number' ? e.responseCode : undefined;
  const permanent = responseCode !== undefined && MESSAGE_CODES.has(code) && isPermanentResponseCode(responseCode);
  return {
    code,
    responseCode,
    response: typeof e.response === 'string' ? e.response.slice(0, 500) : undefined,
    permanent,
    message: oneLine(String(e.message ?? err)),
  };
}

function oneLine(text: string): string {
  return text.replace(/\s+/g, ' ').trim().slice(0, 300);
}
