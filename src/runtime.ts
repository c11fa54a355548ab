// The Runtime: one immutable snapshot of everything a message needs — the frozen config, each user's
// compiled selector and the downstream pools. A reload builds a complete new Runtime off to the side
// and swaps one reference; pools and selectors that did not change are carried over, and the old
// Runtime closes what was not carried once its last in-flight message is done.
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { storedPassword, type StoredPassword } from './auth/password';
import { ConfigError, type Config, type QueueConfig, type UserConfig } from './config/load';
import { DownstreamPool, poolKey, type PoolSettings } from './delivery/pool';
import type { DeliveryTarget } from './delivery/delivery';
import { DownstreamGate, stateKey } from './downstreams/gate';
import { readSelector, SelectorLoadError, SelectorSandbox } from './selector/sandbox';
import type { DownstreamConfigView, DownstreamView } from './selector/types';
import { MemoryStateStore } from './state/memory';
import type { StateStore } from './state/store';

/** A downstream as the delivery uses it, with what a selector is told about it. */
export interface UserTarget extends DeliveryTarget {
  readonly view: DownstreamConfigView;
  readonly gate: DownstreamGate;
}

export interface UserRuntime {
  readonly email: string;
  /** The selector's path as logs show it: relative to the working folder when inside it. */
  readonly selectorLabel: string;
  readonly selector: SelectorSandbox;
  /** The downstreams as the config describes them, in config order. */
  readonly downstreams: readonly DownstreamConfigView[];
  /** What a selector is given for one message: each downstream's config view with its status now. */
  views(): Promise<readonly DownstreamView[]>;
  /** By name and by addr. */
  readonly targets: ReadonlyMap<string, UserTarget>;
  /** The stored password; its `id` changes when the password does (sessions compare it to end with it). */
  readonly password: StoredPassword;
  /** Store and forward settings; absent: answer 451 when no downstream accepted. */
  readonly queue?: QueueConfig;
}

export interface RuntimeChanges {
  readonly usersAdded: string[];
  readonly usersRemoved: string[];
  readonly usersChanged: string[];
  readonly poolsOpened: number;
  readonly poolsKept: number;
  readonly poolsClosed: number;
  readonly selectorsCompiled: string[];
  readonly selectorsKept: number;
  /** Settings that only take effect after a restart. */
  readonly needsRestart: string[];
}

/** What a Runtime tells its owner (the App), passed in when it is built. */
export interface RuntimeHooks {
  /** A selector's isolate was thrown away and will be rebuilt; `selector` is its file as logs show it. */
  readonly onSelectorRestart?: (selector: string, reason: string) => void;
}

/** A selector's path as logs and metrics show it: relative to the working folder when inside it. */
export function selectorLabel(file: string): string {
  return path.relative(process.cwd(), file) || file;
}

/** A reload that could not be built: every selector that failed, each with file:line:col. */
export class RuntimeBuildError extends Error {
  constructor(readonly failures: readonly SelectorLoadError[]) {
    super(failures.map((f) => f.message).join('\n'));
    this.name = 'RuntimeBuildError';
  }
}

/** How the command line shows a config or selectors that cannot load, a problem a line; undefined for any other error. */
export function describeLoadFailure(err: unknown): string | undefined {
  if (err instanceof ConfigError) return `the config has ${err.problems.length} problem(s):\n${err.problems.map((p) => `  ${p}`).join('\n')}`;
  if (err instanceof RuntimeBuildError) return `${err.failures.length} selector(s) failed to load:\n${err.failures.map((f) => `  ${f.message}`).join('\n')}`;
  return undefined;
}

const digest = (text: string): Buffer => createHash('sha256').update(text, 'utf8').digest();

/**
 * How many live Runtimes hold each pool and sandbox. A resource is carried from Runtime to Runtime, so
 * the one being replaced cannot tell on its own whether an older Runtime, still finishing a message,
 * uses it too: it closes when the last Runtime holding it lets go.
 */
const holders = new WeakMap<DownstreamPool | SelectorSandbox, number>();

function hold(resource: DownstreamPool | SelectorSandbox): void {
  holders.set(resource, (holders.get(resource) ?? 0) + 1);
}

/** True when no Runtime holds the resource any more. */
function letGo(resource: DownstreamPool | SelectorSandbox): boolean {
  const left = (holders.get(resource) ?? 1) - 1;
  if (left > 0) holders.set(resource, left);
  else holders.delete(resource);
  return left <= 0;
}

export class Runtime {
  private inFlight = 0;
  /** Waiting for inFlight to reach 0 (see idle()). */
  private idleWaiters: (() => void)[] = [];
  private retired = false;
  private released = false;

  private constructor(
    readonly config: Config,
    private readonly users: ReadonlyMap<string, UserRuntime>,
    readonly pools: ReadonlyMap<string, DownstreamPool>,
    readonly sandboxes: ReadonlyMap<string, SelectorSandbox>,
    /** Host-side state (ctx.state, downstream health, rates, quotas): owned by whoever made it (the App), shared by every Runtime. */
    readonly state: StateStore,
    /** Per-downstream gates, carried across reloads while their key and policy stay (attempts in flight, probes). */
    readonly gates: ReadonlyMap<string, DownstreamGate>,
  ) {
    for (const pool of pools.values()) hold(pool);
    for (const sandbox of sandboxes.values()) hold(sandbox);
  }

  /**
   * Builds a Runtime from a validated config, reusing what `previous` already has. Either everything
   * compiles and the new Runtime is returned, or nothing it created survives and RuntimeBuildError says why.
   * `state` outlives Runtimes (the App makes it once); without it the previous Runtime's is kept, or a
   * fresh in-memory one is made (`smtpmux check`, `smtpmux try`).
   */
  static async build(config: Config, previous?: Runtime, hooks: RuntimeHooks = {}, state?: StateStore): Promise<{ runtime: Runtime; changes: RuntimeChanges }> {
    const store = state ?? previous?.state ?? new MemoryStateStore();
    const settings: PoolSettings = { ...config.delivery, hostname: config.hostname };
    const gates = new Map<string, DownstreamGate>();
    const limits = { timeoutMs: config.limits.selectorTimeoutMs, memoryMb: config.limits.selectorMemoryMb, maxSends: config.limits.maxSends };
    const pools = new Map<string, DownstreamPool>();
    const sandboxes = new Map<string, SelectorSandbox>();
    const created: SelectorSandbox[] = [];
    const compiled: string[] = [];
    const failures: SelectorLoadError[] = [];

    const sandboxFor = async (user: UserConfig): Promise<SelectorSandbox | undefined> => {
      // A name that resolved to the user's own file and now resolves elsewhere (the bundled library)
      // means that file was deleted: keep the last good version rather than switch scripts silently.
      const before = previous?.config.users.find((u) => u.email.toLowerCase() === user.email.toLowerCase());
      if (before && before.selectorName === user.selectorName && before.selectorPath !== user.selectorPath) {
        const gone = await fs.access(before.selectorPath).then(() => false, () => true);
        if (gone) {
          failures.push(new SelectorLoadError(before.selectorPath, undefined, `cannot read the selector (deleted; "${user.selectorName}" would now mean ${user.selectorPath})`));
          return undefined;
        }
      }
      let source: string;
      try {
        source = await readSelector(user.selectorPath);
      } catch (err) {
        failures.push(err as SelectorLoadError);
        return undefined;
      }
      // One isolate per (user, selector file): users never share a heap.
      const key = JSON.stringify([user.email.toLowerCase(), user.selectorPath, digest(source).toString('hex'), limits]);
      const existing = sandboxes.get(key) ?? previous?.sandboxes.get(key);
      if (existing) {
        sandboxes.set(key, existing);
        return existing;
      }
      try {
        const label = selectorLabel(user.selectorPath);
        const onRestart = hooks.onSelectorRestart;
        const sandbox = await SelectorSandbox.fromSource(user.selectorPath, source, limits, onRestart ? { onRestart: (reason) => onRestart(label, reason) } : {});
        created.push(sandbox);
        compiled.push(user.selectorPath);
        sandboxes.set(key, sandbox);
        return sandbox;
      } catch (err) {
        failures.push(err instanceof SelectorLoadError ? err : new SelectorLoadError(user.selectorPath, undefined, String(err)));
        return undefined;
      }
    };

    const users = new Map<string, UserRuntime>();
    for (const user of config.users) {
      const selector = await sandboxFor(user);
      const entries: UserTarget[] = user.downstreams.map((ds) => {
        const key = poolKey(ds, settings);
        const pool = pools.get(key) ?? previous?.pools.get(key) ?? new DownstreamPool(ds, settings);
        pools.set(key, pool);
        const view: DownstreamConfigView = Object.freeze({ name: ds.name, addr: ds.addr, host: ds.host, port: ds.port, tls: ds.tls, tags: ds.tags, weight: ds.weight });
        const policy = { rate: ds.rate, quota: ds.quota, count: ds.count, cooldown: ds.cooldown };
        const gateKey = JSON.stringify([stateKey(user.email, ds), policy]);
        const gate = gates.get(gateKey) ?? previous?.gates.get(gateKey) ?? new DownstreamGate(stateKey(user.email, ds), policy, store);
        gates.set(gateKey, gate);
        return { name: ds.name, view, pool, gate, from: ds.from };
      });
      const views = entries.map((e) => e.view);
      // A downstream is found by addr or by name; names win where one's name is another's addr.
      const targets = new Map<string, UserTarget>([...entries.map((e) => [e.view.addr, e] as const), ...entries.map((e) => [e.view.name, e] as const)]);
      if (selector) {
        users.set(user.email.toLowerCase(), {
          email: user.email,
          selectorLabel: selectorLabel(user.selectorPath),
          selector,
          downstreams: Object.freeze(views),
          views: () => Promise.all(entries.map(async (e): Promise<DownstreamView> => ({ ...e.view, ...(await e.gate.view()) }))),
          targets,
          password: storedPassword(user.password),
          queue: user.queue,
        });
      }
    }

    if (failures.length > 0) {
      for (const sandbox of created) sandbox.dispose();
      for (const [key, pool] of pools) if (!previous?.pools.has(key)) pool.close();
      throw new RuntimeBuildError(failures);
    }

    const runtime = new Runtime(config, users, pools, sandboxes, store, gates);
    return { runtime, changes: describeChanges(previous, runtime, compiled) };
  }

  /**
   * A short hash of what this Runtime runs: the config without credentials, and each selector's source
   * (by its sandbox key). Two instances with the same files show the same hash; it reveals no secret.
   */
  get fingerprint(): string {
    // Whatever may hold a secret is listed by hand: passwords, downstream logins, the http token,
    // TLS key material, a Redis URL's password.
    const { users, http, tls, state, ...rest } = this.config;
    const shown = {
      ...rest,
      http: http && { host: http.host, port: http.port, token: http.token !== undefined },
      tls: tls && { certFile: tls.certFile, keyFile: tls.keyFile, implicit: tls.implicit, cert: createHash('sha256').update(tls.material.cert).digest('hex') },
      state: { prefix: state.prefix, timeoutMs: state.timeoutMs, redis: state.redis?.replace(/\/\/[^@/]*@/, '//') },
      users: users.map(({ password: _password, downstreams, ...user }) => ({ ...user, downstreams: downstreams.map(({ user: _user, pass: _pass, ...ds }) => ds) })),
      selectors: [...this.sandboxes.keys()].sort(),
    };
    return createHash('sha256').update(JSON.stringify(shown)).digest('hex').slice(0, 12);
  }

  /** The user these credentials log in as, or undefined; a hashed password is verified off the event loop. */
  async authenticate(username: string, password: string): Promise<UserRuntime | undefined> {
    const user = this.users.get(username.toLowerCase());
    return user && (await user.password.verify(password)) ? user : undefined;
  }

  user(email: string): UserRuntime | undefined {
    return this.users.get(email.toLowerCase());
  }

  get userEmails(): string[] {
    return [...this.users.values()].map((u) => u.email);
  }

  /** Marks a message in flight on this Runtime; call the returned function when its reply is sent. */
  acquire(): () => void {
    this.inFlight++;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.inFlight--;
      if (this.inFlight > 0) return;
      for (const resolve of this.idleWaiters.splice(0)) resolve();
      if (this.retired) this.closeLeftovers();
    };
  }

  /** Resolves when no message is in flight on this Runtime (at once when none is). */
  idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /**
   * This Runtime is replaced (or shut down). Once its last message is done it lets go of its pools and
   * sandboxes; those no other Runtime holds (the next one, or an older one still finishing a message)
   * are closed.
   */
  retire(): void {
    this.retired = true;
    if (this.inFlight === 0) this.closeLeftovers();
  }

  get busy(): boolean {
    return this.inFlight > 0;
  }

  private closeLeftovers(): void {
    if (this.released) return;
    this.released = true;
    for (const pool of this.pools.values()) if (letGo(pool)) pool.close();
    for (const sandbox of this.sandboxes.values()) if (letGo(sandbox)) sandbox.dispose();
  }
}

function describeChanges(previous: Runtime | undefined, next: Runtime, compiled: string[]): RuntimeChanges {
  const before = new Map((previous?.config.users ?? []).map((u) => [u.email.toLowerCase(), JSON.stringify(u)]));
  const after = new Map(next.config.users.map((u) => [u.email.toLowerCase(), JSON.stringify(u)]));
  const needsRestart: string[] = [];
  if (previous) {
    const [a, b] = [previous.config.listen, next.config.listen];
    if (a.host !== b.host || a.port !== b.port) needsRestart.push(`listen (${a.host}:${a.port} → ${b.host}:${b.port})`);
    const [h, i] = [previous.config.http, next.config.http];
    const where = (c: typeof h): string => (c ? `${c.host}:${c.port}` : 'off');
    if (where(h) !== where(i)) needsRestart.push(`http (${where(h)} → ${where(i)})`);
    if (previous.config.hostname !== next.config.hostname) needsRestart.push('hostname (in the greeting to clients; downstreams see the new one)');
    if (JSON.stringify(previous.config.state) !== JSON.stringify(next.config.state)) needsRestart.push('state (the state store is created once, at start)');
    const [t, u] = [previous.config.tls, next.config.tls];
    if (!t !== !u) needsRestart.push(u ? 'tls (STARTTLS is offered only after a restart)' : 'tls (removing it takes a restart; the certificate keeps serving until then)');
    if (JSON.stringify(t?.implicit) !== JSON.stringify(u?.implicit)) needsRestart.push('tls.implicit (the implicit-TLS listener)');
    if (JSON.stringify(previous.config.proxyProtocol) !== JSON.stringify(next.config.proxyProtocol)) needsRestart.push('proxy_protocol');
  }
  return {
    usersAdded: [...after.keys()].filter((k) => !before.has(k)),
    usersRemoved: [...before.keys()].filter((k) => !after.has(k)),
    usersChanged: [...after.keys()].filter((k) => before.has(k) && before.get(k) !== after.get(k)),
    poolsOpened: [...next.pools.keys()].filter((k) => !previous?.pools.has(k)).length,
    poolsKept: [...next.pools.keys()].filter((k) => previous?.pools.has(k)).length,
    poolsClosed: [...(previous?.pools.keys() ?? [])].filter((k) => !next.pools.has(k)).length,
    selectorsCompiled: compiled,
    selectorsKept: next.sandboxes.size - compiled.length,
    needsRestart,
  };
}
