// The sizes and counts a selector run is held to, in one place: the bootstrap gets them at load (its
// checks fail a bad call at once, without crossing), and the host checks them again on its side.

/** Bounds on what crosses out of the isolate. */
export const BOUNDS = {
  /** Characters of one log line, reason or error text. */
  text: 2000,
  /** Downstreams in a returned list. */
  targets: 100,
  /** Characters of a downstream name or an error name. */
  name: 200,
  /** Arguments of one log() call that are shown. */
  logArgs: 20,
  /** Characters of a ctx.state key. */
  stateKey: 200,
  /** Characters of a ctx.state value, as JSON. */
  stateValue: 8192,
  /** Longest ctx.state ttlMs: 30 days. */
  ttlMs: 30 * 86_400_000,
} as const;

/** What one run may do, besides limits.max_sends and limits.selector_timeout_ms. */
export const RUN_CAPS = {
  /** log() lines per run. */
  logLines: 50,
  /** Bytes of log text per run (UTF-8). */
  logBytes: 32 * 1024,
  /** ctx.state calls per run. */
  stateCalls: 50,
} as const;

/** Live ctx.state keys one user may hold. */
export const STATE_KEYS_PER_USER = 1000;
