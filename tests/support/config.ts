// The one way tests write a config: an object in the config file's own vocabulary (snake_case keys),
// with test defaults filled in, turned into YAML by the yaml package. No hand-written YAML templates,
// so a value never needs quoting by hand and a key never hides in a string.
import YAML from 'yaml';

export interface DownstreamSpec {
  readonly name?: string;
  readonly addr: string;
  readonly user?: string;
  readonly pass?: string;
  /** Default `none`: test downstreams speak plain SMTP on loopback. */
  readonly tls?: string;
  readonly tags?: readonly string[];
  readonly weight?: number;
  readonly [key: string]: unknown;
}

export interface UserSpec {
  /** Default test@user.com. */
  readonly email?: string;
  /** Default password123. */
  readonly password?: string;
  readonly selector: string;
  readonly downstreams: readonly DownstreamSpec[];
  readonly [key: string]: unknown;
}

/**
 * Either `users`, or one user given by `selector` + `downstreams` (+ `email`, `password`). Every other
 * key is a top-level config key as the YAML spells it (`limits`, `delivery`, `max_message_size`...).
 * Defaults: listen on 127.0.0.1, port 0; the admin listener (http) on 127.0.0.1, port 0 (never the
 * default 9587 another test or process may hold); allow_insecure_auth true.
 */
export type ConfigSpec = {
  readonly users?: readonly UserSpec[];
  readonly selector?: string;
  readonly downstreams?: readonly DownstreamSpec[];
  readonly email?: string;
  readonly password?: string;
  readonly [key: string]: unknown;
};

/** Short selector limits and delivery timeouts, so a failing test fails fast: spread into a ConfigSpec. */
export const TEST_LIMITS = {
  limits: { selector_timeout_ms: 1000, selector_memory_mb: 32 },
  delivery: { connect_timeout_ms: 1000, socket_timeout_ms: 5000 },
} as const;

function userEntry(user: UserSpec): Record<string, unknown> {
  const { email, password, selector, downstreams, ...rest } = user;
  return {
    email: email ?? 'test@user.com',
    password: password ?? 'password123',
    selector,
    ...rest,
    downstreams: downstreams.map((d) => ({ ...d, tls: d.tls ?? 'none' })),
  };
}

/** The config as an object, defaults filled in (for tests that want to tweak it before writing). */
export function configObject(spec: ConfigSpec): Record<string, unknown> {
  const { users, selector, downstreams, email, password, listen, allow_insecure_auth, http, ...rest } = spec;
  const list = users ?? (selector !== undefined && downstreams !== undefined ? [{ email, password, selector, downstreams }] : []);
  return {
    listen: { host: '127.0.0.1', port: 0, ...(listen as object | undefined) },
    allow_insecure_auth: allow_insecure_auth ?? true,
    ...rest,
    users: list.map(userEntry),
    // Last, so the lines of every other key stay where tests expect them.
    http: http ?? { host: '127.0.0.1', port: 0 },
  };
}

/** The config as YAML text, ready to write to a file. */
export function testConfig(spec: ConfigSpec): string {
  return YAML.stringify(configObject(spec));
}
