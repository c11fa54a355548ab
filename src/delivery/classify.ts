// Turns a nodemailer failure into the facts we act on: temporary or permanent, with code and reply.
// Connection-level failures and 4xx replies are temporary; 5xx replies are permanent (503 excepted,
// as nodemailer's own isPermanentResponseCode says: a bad command sequence is worth retrying).
import { isPermanentResponseCode, type NodemailerError } from 'nodemailer/lib/errors';

export interface AttemptFailure {
  readonly code: string;
  readonly responseCode?: number;
  readonly response?: string;
  readonly permanent: boolean;
  readonly message: string;
}

/** Failures that say our own setup is wrong rather than the message: retrying later may help. */
const CONFIG_CODES = new Set(['EAUTH', 'ENOAUTH', 'ETLS', 'EREQUIRETLS', 'ECONFIG']);

export function classifyFailure(err: unknown): AttemptFailure {
  const e = (err ?? {}) as NodemailerError;
  const code = typeof e.code === 'string' ? e.code : 'EUNKNOWN';
  const responseCode = typeof e.responseCode === 'number' ? e.responseCode : undefined;
  // A rejected login or TLS problem is our configuration, not the message: the client should retry
  // later (after someone fixes it), not bounce the message.
  const permanent = responseCode !== undefined && !CONFIG_CODES.has(code) && isPermanentResponseCode(responseCode);
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
