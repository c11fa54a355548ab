// Ambient declarations for SMTP Mux selector scripts: what a script sees, and nothing more.
//
// Selector scripts are plain JavaScript run in an isolated-vm isolate. Put these two lines at the top of
// a script so an editor (or `tsc -p selectors`) type-checks it against this file:
//
//   // @ts-check
//   /// <reference path="./smtpmux.d.ts" />
//
// and annotate the entry point:
//
//   /** @param {Message} message @param {readonly Downstream[]} downstreams @param {Ctx} ctx @returns {SelectResult} */
//   function select(message, downstreams, ctx) { ... }
//
// This file is a global declaration file (no import/export): every name below is a global of the sandbox.
// There is no require, process, timers, fs or network inside the sandbox, so none is declared here.

/** The message being routed: a frozen, read-only copy of its envelope and a few headers. */
interface Message {
  /** SMTP Mux's id for this message (also in the host's log lines). */
  readonly id: string;
  /** The login (email) of the SMTP Mux user who submitted the message. */
  readonly user: string;
  /** Envelope sender (MAIL FROM), e.g. "alice@example.com"; "" for a null sender (bounces). */
  readonly from: string;
  /** Envelope recipients (RCPT TO), in the order given; at least one for a normal message. */
  readonly to: readonly string[];
  /** Size of the message in bytes, headers included. */
  readonly size: number;
  /** The decoded Subject header; "" when there is none. */
  readonly subject: string;
  /** IP address of the client that submitted the message ("" for a bounce SMTP Mux wrote). */
  readonly clientAddress: string;
  /** 1 while the client waits for the answer; 2, 3, ... when a queued message is retried (see `queue` in the README). */
  readonly attempt: number;
  /** When the message was queued, as ISO 8601 (e.g. "2026-11-26T09:30:00.000Z"); null while the client waits. */
  readonly queuedAt: string | null;
}

/** How SMTP Mux talks TLS to a downstream (the `tls` key of its config). */
type DownstreamTls = 'auto' | 'none' | 'starttls' | 'tls';

/** A downstream SMTP server of the user, as configured: a frozen copy, never its credentials. */
interface Downstream {
  /** Its name in the config (`name:`, or its `addr` when it has no name); unique per user. */
  readonly name: string;
  /** "host:port" as configured. */
  readonly addr: string;
  /** Host part of `addr`. */
  readonly host: string;
  /** Port part of `addr`. */
  readonly port: number;
  /** TLS mode: "auto", "none", "starttls" or "tls". */
  readonly tls: DownstreamTls | (string & {});
  /** Free-form tags from the config (`tags: [domain:example.com, default]`), for scripts to route by. */
  readonly tags: readonly string[];
  /** Relative weight from the config (default 1, may be 0), for weighted strategies. */
  readonly weight: number;

  // What SMTP Mux knows about the downstream as this message starts (a snapshot; it does not change
  // while the script runs).

  /** "cooling" after a back-off signal (refused or timed-out connection, 421, 454, 4.7.x, quota reply,
   *  login refused) while its `cooldown` runs: it is skipped, and send() to it fails at once with
   *  SMTPMUX_DOWNSTREAM_COOLING. "up" otherwise. */
  readonly state: 'up' | 'cooling';
  /** Until when (milliseconds since the epoch, like Date.now()) it cools; null when up. */
  readonly cooldownUntil: number | null;
  /** Consecutive failed attempts since its last success (0 when healthy). */
  readonly failures: number;
  /** The last failure: nodemailer's or SMTP Mux's code and the downstream's reply text; never credentials. */
  readonly lastError: DownstreamError | null;
  /** Its quota (`quota:` in the config) over the rolling window; null when it has none. */
  readonly quota: DownstreamQuota | null;
  /** Its rate (`rate:` in the config); null when it has none. */
  readonly rate: DownstreamRate | null;
  /** Attempts in flight through it right now (from this SMTP Mux process). */
  readonly inflight: number;
}

interface DownstreamError {
  /** e.g. "ECONNECTION", "ETIMEDOUT", "EAUTH", "EMESSAGE". */
  readonly code: string;
  /** The downstream's reply, e.g. "454 Throttling failure: Maximum sending rate exceeded"; null when it did not answer. */
  readonly response: string | null;
}

interface DownstreamQuota {
  /** What the window allows (messages, or recipients with `count: recipients`). */
  readonly limit: number;
  /** Accepted deliveries (and attempts in flight) in the window now. */
  readonly used: number;
  /** limit − used, never below 0. */
  readonly remaining: number;
  /** When the oldest delivery in the window leaves it (ms since the epoch); null when the window is empty. */
  readonly resetsAt: number | null;
}

interface DownstreamRate {
  /** How many per period. */
  readonly limit: number;
  /** The period in milliseconds (1000 for `14/s`). */
  readonly per: number;
  /** Slots free right now, without waiting. */
  readonly available: number;
}

/** What `await send(ds)` resolves with when a downstream accepted the message. Frozen. */
interface SendResult {
  readonly ok: true;
  /** Name of the downstream that accepted the message. */
  readonly downstream: string;
  /** The downstream's final SMTP reply code (250 normally). */
  readonly responseCode: number;
  /** The downstream's final SMTP reply text, e.g. "250 2.0.0 Ok: queued as 4B1C2". */
  readonly response: string;
  /** How long the delivery took, in milliseconds. */
  readonly ms: number;
}

/**
 * Codes a SendError may carry: nodemailer's delivery codes plus SMTP Mux's own. Other strings are
 * possible (nodemailer grows new codes), so compare against the ones you care about.
 */
type SendErrorCode =
  /** Could not connect to the downstream. */
  | 'ECONNECTION'
  /** The connection or a command timed out. */
  | 'ETIMEDOUT'
  /** A socket error in the middle of the conversation. */
  | 'ESOCKET'
  /** The downstream refused SMTP Mux's login. */
  | 'EAUTH'
  /** The downstream wants a login but none is configured. */
  | 'ENOAUTH'
  /** The downstream rejected the sender or the recipients. */
  | 'EENVELOPE'
  /** The downstream rejected the message data. */
  | 'EMESSAGE'
  /** The downstream's host name did not resolve. */
  | 'EDNS'
  /** TLS negotiation failed. */
  | 'ETLS'
  /** The downstream spoke something that is not SMTP, or answered out of turn. */
  | 'EPROTOCOL'
  /** Reading the message to send failed. */
  | 'ESTREAM'
  /** No downstream of this user has that name. */
  | 'SMTPMUX_UNKNOWN_DOWNSTREAM'
  /** An earlier send() of this message already succeeded: it is never sent twice. */
  | 'SMTPMUX_ALREADY_DELIVERED'
  /** This run has used up its send() calls (`limits.max_sends` in the config). */
  | 'SMTPMUX_SEND_LIMIT'
  /** The selector run for this message is already over. */
  | 'SMTPMUX_RUN_OVER'
  /** The global send() was called while no message's run was executing (at load time): use ctx.send(). */
  | 'SMTPMUX_NO_RUN'
  /** The downstream is cooling down after a back-off signal; it was not contacted (temporary). */
  | 'SMTPMUX_DOWNSTREAM_COOLING'
  /** The downstream is at its rate and no slot frees within delivery.rate_wait_ms (temporary). */
  | 'SMTPMUX_DOWNSTREAM_RATE'
  /** The downstream has no quota left in its window (temporary). */
  | 'SMTPMUX_DOWNSTREAM_QUOTA'
  | (string & {});

/** The plain record a SendError is built from. */
interface SendErrorRecord {
  readonly code: SendErrorCode;
  readonly downstream: string | null;
  readonly response?: string;
  readonly responseCode?: number;
  readonly permanent: boolean;
  readonly message: string;
}

/**
 * What `send()` throws when a delivery attempt failed. A global class: test with `err instanceof SendError`.
 * Letting one escape select() fails the message, and the host answers the client from the attempts made
 * (temporary 4xx unless every downstream refused permanently).
 */
declare class SendError extends Error {
  constructor(record: SendErrorRecord);
  readonly name: 'SendError';
  /** Why it failed, e.g. "ECONNECTION", "EENVELOPE", "SMTPMUX_ALREADY_DELIVERED". */
  readonly code: SendErrorCode;
  /** Name of the downstream tried; null when the argument named no downstream. */
  readonly downstream: string | null;
  /** The downstream's SMTP reply text, when it answered at all. */
  readonly response: string | undefined;
  /** The downstream's SMTP reply code (421, 450, 550, 554, ...), when it answered at all. */
  readonly responseCode: number | undefined;
  /** True when retrying later will not help (a 5xx reply); false for temporary failures. */
  readonly permanent: boolean;
}

/** Codes a StateError may carry. */
type StateErrorCode =
  /** The key is not a string of 1 to 200 characters. */
  | 'SMTPMUX_STATE_BAD_KEY'
  /** set(): the value has no JSON form (undefined, a function, a BigInt, a cycle). */
  | 'SMTPMUX_STATE_NOT_JSON'
  /** set(): the value's JSON is longer than 8192 characters. */
  | 'SMTPMUX_STATE_TOO_BIG'
  /** incr(): the step, the stored value or the result is not a safe integer. */
  | 'SMTPMUX_STATE_NOT_INTEGER'
  /** ttlMs is not a whole number of milliseconds from 1 to 30 days. */
  | 'SMTPMUX_STATE_BAD_TTL'
  /** set()/incr() would create key number 1001 of this user. */
  | 'SMTPMUX_STATE_FULL'
  /** This message has used its 50 ctx.state calls. */
  | 'SMTPMUX_STATE_LIMIT'
  /** The state backend could not be reached. */
  | 'SMTPMUX_STATE_UNAVAILABLE'
  /** The selector run for this message is already over. */
  | 'SMTPMUX_RUN_OVER'
  | (string & {});

/** What a ctx.state call rejects with. A global class: test with `err instanceof StateError`. */
declare class StateError extends Error {
  readonly name: 'StateError';
  readonly code: StateErrorCode;
}

/**
 * Small values a script keeps across messages and reloads, per user (scripts of other users never see
 * them). Every call is async and one atomic step on the host. Values are JSON copies: what `get` returns
 * is a fresh object, changing it changes nothing until you `set` it. Bounds: keys of 1 to 200
 * characters, values of at most 8192 characters of JSON, 1000 live keys per user, 50 calls per message.
 */
interface State {
  /** The value stored under `key`, or undefined when there is none (or it expired). */
  get<T = unknown>(key: string): Promise<T | undefined>;
  /** Stores a JSON-able value; with `ttlMs` it expires that many milliseconds from now. */
  set(key: string, value: unknown, options?: { readonly ttlMs?: number }): Promise<void>;
  /**
   * Adds `by` (default 1) to the integer under `key` (missing counts as 0) and resolves with the new
   * value, atomically: concurrent messages never get the same number. `ttlMs` applies when the key is created.
   */
  incr(key: string, by?: number, options?: { readonly ttlMs?: number }): Promise<number>;
}

/**
 * The run context: the third argument of select(), bound to this message. Prefer it to the global
 * send()/log(), which only know the message whose step is running.
 */
interface Ctx {
  /**
   * Delivers this message through `ds` (a downstream object or its name) now. Resolves with the
   * downstream's reply when it accepted the message; rejects with a SendError otherwise. Once one send()
   * succeeded the message is delivered and later calls reject with code SMTPMUX_ALREADY_DELIVERED.
   */
  send(ds: Downstream | string): Promise<SendResult>;
  /** Writes a line to SMTP Mux's log with this message's id (values are JSON-encoded; 50 lines and 32 KiB per message). */
  log(...args: unknown[]): void;
  /** Values kept across messages and reloads, per user. */
  readonly state: State;
}

/**
 * ctx.send() for the message whose step is running: the one select() was called for, or whose send()
 * just answered. Rejects with SMTPMUX_NO_RUN when no message is running (at load time). A promise one
 * message keeps in module state and another awaits runs as the message that settled it: use ctx.send().
 */
declare function send(ds: Downstream | string): Promise<SendResult>;

/** ctx.log() for the message whose step is running; throws (code SMTPMUX_NO_RUN) when none is. */
declare function log(...args: unknown[]): void;

/** console.* are aliases of log(). */
interface Console {
  log(...args: any[]): void;
  info(...args: any[]): void;
  warn(...args: any[]): void;
  error(...args: any[]): void;
  debug(...args: any[]): void;
}
declare var console: Console;

/**
 * What select() may return (or resolve with):
 * - a list of downstreams (objects or names): the host tries them in order, stopping at the first that accepts;
 * - a single downstream object, or a downstream's name: a list of one;
 * - any other string: the message fails with that string as the reason;
 * - undefined (nothing): the script drove send() itself and is done.
 * Throwing also fails the message; an escaping SendError is treated as that send's failure.
 */
type SelectResult = readonly (Downstream | string)[] | Downstream | string | undefined | void;

/** The shape of a selector's entry point: `function select(message, downstreams, ctx)`, sync or async. */
type SelectFunction = (message: Message, downstreams: readonly Downstream[], ctx: Ctx) => SelectResult | Promise<SelectResult>;
