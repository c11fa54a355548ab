// The error catalogue: every failure SMTP Mux can answer a client with, as a code, an SMTP reply code,
// an enhanced status code (RFC 3463) and the sentence a human reads. Replies, log lines and the README's
// table all come from here (tests/errors-doc.test.ts keeps the README in step).

export interface CatalogueEntry {
  readonly reply: number;
  readonly enhanced: string;
  readonly text: string;
}

export const CATALOGUE = {
  SMTPMUX_AUTH_REQUIRED: { reply: 530, enhanced: '5.7.0', text: 'Authentication required: log in with AUTH before sending mail' },
  SMTPMUX_AUTH_FAILED: { reply: 535, enhanced: '5.7.8', text: 'Authentication failed: unknown user or wrong password' },
  SMTPMUX_AUTH_INSECURE: { reply: 538, enhanced: '5.7.11', text: 'Plaintext authentication is disabled on this connection (set allow_insecure_auth to allow it)' },
  SMTPMUX_AUTH_LOCKED: { reply: 454, enhanced: '4.7.0', text: 'Too many failed logins from your address; try again later' },
  SMTPMUX_AUTH_TOO_MANY_FAILURES: { reply: 421, enhanced: '4.7.0', text: 'Too many failed logins on this connection; closing it' },
  SMTPMUX_AUTH_TIMEOUT: { reply: 421, enhanced: '4.7.0', text: 'No login in time; closing the connection' },
  SMTPMUX_ADDRESS_LOCKED: { reply: 421, enhanced: '4.7.0', text: 'Too many failed logins from your address; try again later' },
  SMTPMUX_TOO_MANY_CONNECTIONS: { reply: 421, enhanced: '4.7.0', text: 'Too many connections; try again in a moment' },
  SMTPMUX_TOO_MANY_CONNECTIONS_FROM_ADDRESS: { reply: 421, enhanced: '4.7.0', text: 'Too many connections from your address; try again in a moment' },
  SMTPMUX_LOGIN_CHANGED: { reply: 421, enhanced: '4.7.0', text: 'Your login was changed or removed; reconnect and log in again' },
  SMTPMUX_TOO_MANY_RECIPIENTS: { reply: 452, enhanced: '4.5.3', text: 'Too many recipients for one message; send the rest in another message' },
  SMTPMUX_MESSAGE_TOO_BIG: { reply: 552, enhanced: '5.3.4', text: 'Message exceeds the maximum message size' },
  SMTPMUX_RECEIVE_FAILED: { reply: 451, enhanced: '4.3.0', text: 'The message could not be received; please try again' },
  SMTPMUX_INTERNAL: { reply: 451, enhanced: '4.3.0', text: 'An internal error stopped this message; please try again later' },
  SMTPMUX_SELECTOR_FAILED: { reply: 451, enhanced: '4.3.0', text: 'The routing script failed; the message was not sent, please try again later' },
  SMTPMUX_SELECTOR_TIMEOUT: { reply: 451, enhanced: '4.3.0', text: 'The routing script ran out of time; the message was not sent, please try again later' },
  SMTPMUX_SELECTOR_MEMORY: { reply: 451, enhanced: '4.3.0', text: 'The routing script ran out of memory; the message was not sent, please try again later' },
  SMTPMUX_SELECTOR_BAD_RESULT: { reply: 451, enhanced: '4.3.0', text: 'The routing script returned no usable downstream; the message was not sent' },
  SMTPMUX_SELECTOR_UNAVAILABLE: { reply: 451, enhanced: '4.3.0', text: 'The routing script is not loaded; the message was not sent, please try again later' },
  SMTPMUX_DOWNSTREAMS_UNAVAILABLE: { reply: 451, enhanced: '4.4.1', text: 'No downstream server accepted the message for now; please try again later' },
  SMTPMUX_DOWNSTREAMS_LIMITED: { reply: 451, enhanced: '4.4.1', text: 'Every downstream server is cooling down after failures or at its rate or quota limit; please try again later' },
  SMTPMUX_DOWNSTREAM_REJECTED: { reply: 554, enhanced: '5.0.0', text: 'Every downstream server refused the message permanently' },
  SMTPMUX_USER_GONE: { reply: 451, enhanced: '4.7.0', text: 'Your login is no longer configured; reconnect and log in again' },
  SMTPMUX_SPOOL_FULL: { reply: 452, enhanced: '4.3.1', text: 'The mail queue is full; the message was not accepted, please try again later' },
  SMTPMUX_SPOOL_FAILED: { reply: 451, enhanced: '4.3.0', text: 'No downstream accepted the message and it could not be queued; please try again later' },
  SMTPMUX_SHUTTING_DOWN: { reply: 421, enhanced: '4.3.2', text: 'SMTP Mux is shutting down; please try again later' },
} as const satisfies Record<string, CatalogueEntry>;

export type ErrorCode = keyof typeof CATALOGUE;

/** An error that knows the SMTP reply it turns into. smtp-server replies with `responseCode` and `message`. */
export class SmtpMuxError extends Error {
  readonly code: ErrorCode;
  readonly responseCode: number;
  readonly enhanced: string;

  constructor(
    code: ErrorCode,
    readonly detail?: string,
    private readonly override?: { reply?: number; enhanced?: string },
  ) {
    const entry: CatalogueEntry = CATALOGUE[code];
    const enhanced = override?.enhanced ?? entry.enhanced;
    super(`${enhanced} ${entry.text}${detail ? ` (${detail})` : ''}`);
    this.name = 'SmtpMuxError';
    this.code = code;
    this.responseCode = override?.reply ?? entry.reply;
    this.enhanced = enhanced;
  }

  /** The same error with more detail for the reply, e.g. the message id to look up in the log. */
  withDetail(more: string): SmtpMuxError {
    return new SmtpMuxError(this.code, this.detail ? `${more}; ${this.detail}` : more, this.override);
  }

}

/** Codes the send() bridge hands to a selector script besides nodemailer's own (ECONNECTION, EAUTH, ...). */
export const SEND_CODES = {
  SMTPMUX_UNKNOWN_DOWNSTREAM: 'No downstream by that name is configured for this user',
  SMTPMUX_ALREADY_DELIVERED: 'This message was already delivered; it is not sent twice',
  SMTPMUX_SEND_LIMIT: 'Too many send() calls for one message',
  SMTPMUX_RUN_OVER: 'The selector run for this message is over',
  SMTPMUX_NO_RUN: 'No selector run is executing: call send() and log() from select(), or use ctx.send() and ctx.log()',
  SMTPMUX_DOWNSTREAM_COOLING: 'This downstream is cooling down after failures and is not contacted for now',
  SMTPMUX_DOWNSTREAM_RATE: 'This downstream is at its rate limit and no slot frees within the wait allowed',
  SMTPMUX_DOWNSTREAM_QUOTA: 'This downstream has no quota left for now',
} as const;

export type SendCode = keyof typeof SEND_CODES;

/** Codes of the StateError that ctx.state calls reject with. */
export const STATE_CODES = {
  SMTPMUX_STATE_BAD_KEY: 'A ctx.state key must be a non-empty string',
  SMTPMUX_STATE_NOT_JSON: 'A ctx.state value must be JSON-able',
  SMTPMUX_STATE_TOO_BIG: 'The ctx.state value is too big',
  SMTPMUX_STATE_NOT_INTEGER: 'incr() needs an integer value and step',
  SMTPMUX_STATE_BAD_TTL: 'ttlMs must be a whole number of milliseconds',
  SMTPMUX_STATE_FULL: 'This user holds too many ctx.state keys',
  SMTPMUX_STATE_LIMIT: 'Too many ctx.state calls for one message',
  SMTPMUX_STATE_UNAVAILABLE: 'ctx.state is not available right now',
} as const;

export type StateCode = keyof typeof STATE_CODES;
