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
}

/** What a selector learns about a downstream: never its credentials. */
export interface DownstreamView {
  readonly name: string;
  readonly addr: string;
  readonly host: string;
  readonly port: number;
  readonly tls: string;
  readonly tags: readonly string[];
  readonly weight: number;
}

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
