// The plain data that crosses the sandbox boundary, in both directions. Nothing else crosses.
import type { SelectorState } from './state';

/** What a selector learns about a message: a read-only copy of the envelope and a few headers. */
export interface MessageSummary {
  readonly id: string;
  readonly user: string;
  readonly from: string;
  readonly to: readonly string[];
  readonly size: number;
  readonly subject: string;
  readonly clientAddress: string;
  /** 1 while the client waits; 2, 3, ... for retries of a queued message. */
  readonly attempt: number;
  /** When the message was queued (ISO 8601), or null while the client waits. */
  readonly queuedAt: string | null;
}

/** What a selector learns about a downstream from the config: never its credentials. */
export interface DownstreamConfigView {
  readonly name: string;
  readonly addr: string;
  readonly host: string;
  readonly port: number;
  readonly tls: string;
  readonly tags: readonly string[];
  readonly weight: number;
}

/** What the host knows about a downstream right now (src/downstreams/gate.ts), as of the message's start. */
export interface DownstreamStatus {
  readonly state: 'up' | 'cooling';
  /** Until when (ms since the epoch) it is not contacted; null when up. */
  readonly cooldownUntil: number | null;
  /** Consecutive failures since its last success. */
  readonly failures: number;
  /** The last failure: a code and the downstream's reply text, never credentials. */
  readonly lastError: { readonly code: string; readonly response: string | null } | null;
  readonly quota: { readonly limit: number; readonly used: number; readonly remaining: number; readonly resetsAt: number | null } | null;
  /** `per`: the period in milliseconds; `available`: slots free right now. */
  readonly rate: { readonly limit: number; readonly per: number; readonly available: number } | null;
  /** Attempts in flight through it from this process. */
  readonly inflight: number;
}

/** What a selector learns about a downstream: its config (never credentials) and its status. */
export type DownstreamView = DownstreamConfigView & DownstreamStatus;

/** The record send() resolves with (ok) or turns into a thrown SendError (not ok). */
export type SendRecord =
  | { ok: true; downstream: string; responseCode: number; response: string; ms: number }
  | { ok: false; downstream: string | null; code: string; responseCode?: number; response?: string; permanent: boolean; message: string; ms: number };

/** How a selector run ended, as the host sees it. */
export type SelectorOutcome =
  /** It returned an ordered list of downstream names for the host to try. */
  | { kind: 'order'; targets: string[] }
  /** It returned nothing (it drove send() itself, or chose nobody). */
  | { kind: 'none' }
  /** It returned or threw a reason for failing. */
  | { kind: 'reason'; reason: string; location?: string }
  /** It broke a rule of the sandbox: threw a bug, overran, ran out of memory, returned nonsense. */
  | { kind: 'fault'; fault: 'threw' | 'timeout' | 'memory' | 'bad-result' | 'unavailable'; detail: string; location?: string };

/** What one selector run may ask of the host. */
export interface RunHost {
  send(target: string | null): Promise<SendRecord>;
  log(text: string): void;
  /** ctx.state for the run's user; without it, ctx.state calls fail with SMTPMUX_STATE_UNAVAILABLE. */
  readonly state?: Pick<SelectorState, 'call'>;
}
