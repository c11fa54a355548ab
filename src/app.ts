// The App: start-up is the first reload, shutdown the last. Everything that opens a resource is a part
// of one lifecycle (src/lifecycle.ts), started in order and closed in reverse: the config watcher stops,
// the SMTP listener stops accepting and lets in-flight messages finish, then pools and isolates close.
import { EventEmitter } from 'node:events';
import { readFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import type { SMTPServer } from 'smtp-server';
import { LoginPenalties } from './auth/penalty';
import { loadConfig, insecureListenerWarning, plaintextPasswordWarning, ConfigError, type Config, type Env } from './config/load';
import { FileWatcher, type WatchOptions } from './config/watch';
import { SmtpMuxError } from './errors';
import { startAdminServer, type AdminServer, type Readiness } from './http/admin';
import type { ReloadStatus, StatusView } from './http/status';
import { Lifecycle, type Part } from './lifecycle';
import { BodyMemory } from './message/body';
import { createLogger, type Logger } from './observe/logger';
import { Metrics, type DownstreamState } from './observe/metrics';
import { Runtime, RuntimeBuildError, type RuntimeHooks } from './runtime';
import { ConnectionGuard } from './smtp/guard';
import { createInboundServer, tlsOptions, type InboundDeps } from './smtp/server';
import { Spool } from './spool/spool';
import { createStateStore } from './state/create';
import type { StateStore } from './state/store';

const VERSION = (() => {
  try {
    return String(JSON.parse(readFileSync(path.join(__dirname, '..', 'package.json'), 'utf8')).version);
  } catch {
    return 'unknown';
  }
})();

/** Seconds between refreshes of the status page. */
const STATUS_REFRESH_SECONDS = 10;

/** The state of every configured downstream (cooldown, quota), read from its gate: what a selector sees. */
function downstreamStates(runtime: Runtime): Promise<DownstreamState[]> {
  return Promise.all(
    runtime.config.users.flatMap((user) =>
      user.downstreams.map(async (ds): Promise<DownstreamState> => {
        const gate = runtime.user(user.email)?.targets.get(ds.name)?.gate;
        const base = { user: user.email, downstream: ds.name };
        if (!gate) return { ...base, up: true };
        const view = await gate.view();
        return {
          ...base,
          up: view.state !== 'cooling',
          cooldownUntil: view.cooldownUntil ?? undefined,
          failures: view.failures,
          lastErrorCode: view.lastError?.code,
          quota: view.quota ? { used: view.quota.used, limit: view.quota.limit } : undefined,
        };
      }),
    ),
  );
}

export interface AppOptions {
  readonly configPath: string;
  readonly env?: Env;
  readonly logger?: Logger;
  /** Where large message bodies spill. */
  readonly tmpDir?: string;
  /** How long shutdown waits for in-flight messages before closing connections. */
  readonly shutdownGraceMs?: number;
  /** Hot reload: watch the config and its selectors (the default), with these options; false = reload only when asked. */
  readonly watch?: WatchOptions | false;
}

export interface ReloadResult {
  readonly ok: boolean;
  readonly problems: readonly string[];
  /** What a watcher should watch from now on: the config and every selector it names. */
  readonly files: readonly string[];
}

export class App {
  private closing = false;
  private closed: Promise<void> | undefined;
  private reloading: Promise<unknown> = Promise.resolve();
  private readonly live = new Set<Runtime>();
  /** Selectors named by the last config that parsed, good or not, so fixing them triggers a reload. */
  private attemptedSelectors: readonly string[] = [];
  /** The listener (STARTTLS when tls is set) and, with tls.implicit, the implicit-TLS one. */
  private readonly server: SMTPServer;
  private readonly implicitServer: SMTPServer | undefined;
  private readonly lifecycle: Lifecycle;
  /** Security events for metrics: auth_failure, auth_success, connection_refused (see InboundDeps.events). */
  readonly events = new EventEmitter();
  /** The open connections of both listeners: limits, login timeout, sessions to end on rotation. */
  private readonly guard = new ConnectionGuard((remote) => {
    this.logger.info({ remote }, 'closed a connection that did not log in within auth_timeout_ms');
    this.events.emit('connection_closed', { reason: 'SMTPMUX_AUTH_TIMEOUT', remote });
  });
  private admin: AdminServer | undefined;
  private lastReload: ReloadStatus | undefined;
  private readonly startedAt = Date.now();
  /** The durable spool, opened when a config first asks for one (`spool:` or a user's `queue:`). */
  private spoolPart: Spool | undefined;

  private constructor(
    private readonly options: AppOptions,
    readonly logger: Logger,
    private current: Runtime,
    /** Cooldowns, rates, quotas, login penalties and ctx.state: created once, outliving reloads. */
    readonly state: StateStore,
    /** This App's metrics registry: never shared with another App. */
    readonly metrics: Metrics,
    private readonly hooks: RuntimeHooks,
  ) {
    this.live.add(current);
    metrics.declare(current.config.users);
    metrics.config(current.fingerprint);
    metrics.setSources({
      connections: () => this.guard.size,
      downstreams: () => downstreamStates(this.current),
      state: () => this.state.status(),
      spool: () => this.spoolPart && { ...this.spoolPart.stats(), counters: { ...this.spoolPart.counters } },
    });
    this.events.on('auth_failure', (event: { reason?: string }) => metrics.authFailure(String(event?.reason)));
    this.events.on('connection_refused', (event: { reason?: string }) => metrics.connectionRefused(String(event?.reason)));
    const deps: InboundDeps = {
      penalties: new LoginPenalties(state, () => this.current.config.loginPenalty),
      current: () => this.current,
      logger,
      metrics,
      closing: () => this.closing,
      tmpDir: options.tmpDir,
      guard: this.guard,
      events: this.events,
      spool: () => this.spoolPart,
      // One budget for both listeners (STARTTLS and implicit TLS): it bounds the process, not a port.
      bodyMemory: new BodyMemory(),
    };
    this.server = createInboundServer(deps, current);
    this.implicitServer = current.config.tls?.implicit ? createInboundServer(deps, current, { implicitTls: true }) : undefined;
    for (const server of this.servers) server.on('error', (err) => logger.error({ err: err.message }, 'SMTP server error'));
    this.lifecycle = new Lifecycle((part, err) => logger.error({ part: part.name, err: String((err as Error)?.message ?? err) }, 'failed to close'));
  }

  /**
   * The parts of the App, in start order; close runs them in reverse. A new long-lived resource is one
   * more entry here, placed by what it needs at close:
   * - `state` first: everything after it may use the store until it closes;
   * - `runtime`, so pools and isolates close once nothing can use them;
   * - a spool next (the SMTP sessions and the HTTP listener may use it until they close);
   * - an HTTP admin listener before `smtp`, so it still answers (readiness 503) while SMTP drains;
   * - `smtp`, the listener: its close stops accepting and waits for in-flight messages;
   * - `watcher` last, so it is the first to stop and no reload starts during shutdown.
   */
  private parts(): Part[] {
    const watch = this.options.watch;
    const parts: Part[] = [
      { name: 'state', start: () => undefined, close: () => this.state.close() }, // created by start()
      {
        name: 'runtime',
        start: () => undefined, // built by start(): start-up is the first reload
        close: async () => {
          await this.reloading;
          this.current.retire();
        },
      },
      // Opened and recovered before the listener accepts anyone, so a crash's leftovers are settled first.
      { name: 'spool', start: () => this.followSpool(this.current), close: () => this.spoolPart?.close(this.options.shutdownGraceMs ?? 30_000) },
    ];
    const http = this.current.config.http;
    if (http) parts.push({ name: 'http', start: () => this.startAdmin(http), close: () => this.admin?.close() });
    parts.push({ name: 'smtp', start: () => this.listen(), close: () => this.closeListener() });
    if (watch !== false) {
      const watcher = new FileWatcher(this.watchedFiles(), async (reason) => (await this.reload(reason)).files, watch);
      parts.push({ name: 'watcher', start: () => watcher.start(), close: () => watcher.stop() });
    }
    return parts;
  }

  /** Loads the config, compiles every selector and starts every part; rejects with ConfigError or RuntimeBuildError. */
  static async start(options: AppOptions): Promise<App> {
    const logger = options.logger ?? createLogger();
    const started = Date.now();
    const config = await loadConfig(options.configPath, options.env);
    const state = await createStateStore(config.state, logger);
    const metrics = new Metrics();
    const hooks: RuntimeHooks = {
      onSelectorRestart: (selector, reason) => metrics.selectorRestart(selector, reason),
    };
    let built: Awaited<ReturnType<typeof Runtime.build>>;
    try {
      // One store for the life of the process: cooldowns, rates and quotas survive every reload.
      built = await Runtime.build(config, undefined, hooks, state);
    } catch (err) {
      await state.close();
      throw err;
    }
    const { runtime } = built;
    // From here on, a part that fails to start closes the ones before it, the state store included.
    const app = new App(options, logger, runtime, state, metrics, hooks);
    await app.lifecycle.start(app.parts());
    for (const warning of config.warnings) logger.warn({ config: config.file }, warning);
    const plaintext = plaintextPasswordWarning(config);
    if (plaintext) logger.warn({ config: config.file }, plaintext);
    app.warnIfInsecure(config);
    if (config.tls && !config.tls.certFile) {
      logger.warn('tls: serving a self-signed certificate made at start-up (selfsigned: true): clients must be told not to verify it; name cert and key for real use');
    }
    if (!config.allowInsecureAuth && !config.tls) {
      logger.warn('allow_insecure_auth is off and TLS is not configured: clients cannot log in until tls is configured or allow_insecure_auth: true (or USE_INSECURE_AUTH=true)');
    }
    logger.info(
      {
        host: config.listen.host,
        port: app.port,
        tls: config.tls ? (app.implicitServer ? 'starttls+implicit' : 'starttls') : 'off',
        implicitTlsPort: app.implicitPort,
        ...app.adminAddress(),
        config: config.file,
        users: runtime.userEmails.length,
        ms: Date.now() - started,
      },
      'SMTP Mux listening',
    );
    return app;
  }

  private get servers(): SMTPServer[] {
    return this.implicitServer ? [this.server, this.implicitServer] : [this.server];
  }

  private warnIfInsecure(config: Config): void {
    const warning = insecureListenerWarning(config);
    if (warning) this.logger.error({ config: config.file }, warning);
  }

  /** The durable spool, if a config asked for one (for metrics and tests). */
  get spool(): Spool | undefined {
    return this.spoolPart;
  }

  get port(): number {
    return (this.server.server.address() as AddressInfo).port;
  }

  /** The implicit-TLS listener's port, when tls.implicit is configured. */
  get implicitPort(): number | undefined {
    return this.implicitServer ? (this.implicitServer.server.address() as AddressInfo).port : undefined;
  }

  /** The admin HTTP listener's port; undefined when `http: false`. */
  get adminPort(): number | undefined {
    return this.admin?.port;
  }

  /** Where the admin listener is, for the start-up log line (its port may have been 0). */
  private adminAddress(): Record<string, unknown> {
    if (!this.admin) return { http: 'off' };
    const host = this.admin.host.includes(':') ? `[${this.admin.host}]` : this.admin.host;
    return { httpPort: this.admin.port, http: `http://${host}:${this.admin.port}/`, httpToken: this.current.config.http?.token !== undefined };
  }

  private async startAdmin(where: { readonly host: string; readonly port: number }): Promise<void> {
    try {
      this.admin = await startAdminServer(where, {
        metrics: this.metrics,
        logger: this.logger,
        token: () => this.current.config.http?.token,
        readiness: () => this.readiness(),
        status: () => this.status(),
      });
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      // Named, so the CLI does not report it as the SMTP port.
      throw Object.assign(new Error(`admin HTTP listener on ${where.host}:${where.port}: ${e.message} (set http.port or SMTPMUX_HTTP_PORT, or http: false)`), { code: e.code, listener: 'http' });
    }
  }

  /**
   * Ready: the SMTP listeners accept and the last config load succeeded. Not ready while shutting down
   * (an orchestrator stops sending new connections while in-flight messages drain) and after a failed
   * reload (the last good config serves, but what was deployed is not what runs).
   */
  readiness(): Readiness {
    if (this.closing) return { ready: false, reason: 'shutting down: finishing the messages in flight' };
    if (!this.servers.every((s) => s.server.listening)) return { ready: false, reason: 'the SMTP listener is not accepting connections' };
    const r = this.lastReload;
    if (r && !r.ok) {
      return { ready: false, reason: `the config reload at ${new Date(r.at).toISOString()} failed (${r.problems.length} problem(s), see the log or the status page); the last good config keeps serving` };
    }
    // Losing the shared state must not take the relay out of the load balancer: ready, and says so.
    const state = this.state.status();
    if (state.degraded) {
      const since = new Date(state.since ?? Date.now()).toISOString();
      return { ready: true, reason: `ready; degraded since ${since}: the shared state (Redis) is unreachable, limits are per instance (${state.reason ?? 'no reason given'})` };
    }
    return { ready: true, reason: 'ready' };
  }

  /** What the status page shows: nothing secret, no message content, no recipient. */
  async status(): Promise<StatusView> {
    const runtime = this.current;
    const [counts, states] = await Promise.all([this.metrics.messageCounts(), downstreamStates(runtime)]);
    const stateOf = new Map(states.map((s) => [`${s.user}\0${s.downstream}`, s]));
    return {
      now: Date.now(),
      startedAt: this.startedAt,
      version: VERSION,
      configFile: path.relative(process.cwd(), runtime.config.file) || runtime.config.file,
      configHash: runtime.fingerprint,
      state: this.state.status(),
      ready: this.readiness(),
      lastReload: this.lastReload,
      refreshSeconds: STATUS_REFRESH_SECONDS,
      spool: this.spoolPart && { ...this.spoolPart.stats(), maxSize: (runtime.config.spool ?? this.spoolPart.config).maxSize },
      users: runtime.config.users.map((user) => {
        const m = counts.get(user.email);
        return {
          email: user.email,
          selector: runtime.user(user.email)?.selectorLabel ?? user.selectorName,
          messages: { delivered: m?.delivered ?? 0, deferred: m?.deferred ?? 0, rejected: m?.rejected ?? 0, queued: m?.queued ?? 0 },
          downstreams: user.downstreams.map((ds) => {
            const state = stateOf.get(`${user.email}\0${ds.name}`);
            return {
              name: ds.name,
              addr: ds.addr,
              tls: ds.tls,
              up: state?.up ?? true,
              cooldownUntil: state?.cooldownUntil,
              failures: state?.failures ?? 0,
              lastErrorCode: state?.lastErrorCode,
              quota: state?.quota,
              recent: this.metrics.recent.summary(user.email, ds.name),
            };
          }),
        };
      }),
    };
  }

  /** Open inbound connections (both listeners). */
  get connections(): number {
    return this.guard.size;
  }

  /** The config file, the TLS certificate and key, and every selector the running and the last attempted config name. */
  watchedFiles(): string[] {
    const { config } = this.current;
    const selectors = [...config.users.map((u) => u.selectorPath), ...this.attemptedSelectors];
    const tls = [config.tls?.certFile, config.tls?.keyFile].filter((f): f is string => f !== undefined);
    return [...new Set([path.resolve(this.options.configPath), ...tls, ...selectors])].sort();
  }

  /**
   * Builds a new Runtime from the config file and swaps it in. A failure changes nothing: the last good
   * Runtime keeps serving and the log says what is wrong. Reloads never overlap.
   */
  reload(reason = 'requested'): Promise<ReloadResult> {
    const next = this.reloading.then(() => this.reloadNow(reason));
    this.reloading = next;
    return next;
  }

  private async reloadNow(reason: string): Promise<ReloadResult> {
    if (this.closing) return { ok: false, problems: ['shutting down'], files: this.watchedFiles() };
    const started = Date.now();
    try {
      const config = await loadConfig(this.options.configPath, this.options.env);
      this.attemptedSelectors = config.users.map((u) => u.selectorPath);
      const { runtime, changes } = await Runtime.build(config, this.current, this.hooks, this.state);
      const previous = this.current;
      this.current = runtime;
      for (const server of this.servers) {
        // smtp-server advertises SIZE and checks MAIL FROM's SIZE= from its options: keep them in step.
        (server.options as { size?: number }).size = config.maxMessageSize;
        // A renewed certificate serves new connections (and STARTTLS) from now on; open ones keep theirs.
        const [before, after] = [previous.config.tls?.material, config.tls?.material];
        if (before && after && (before.cert !== after.cert || before.key !== after.key)) server.updateSecureContext(tlsOptions(after));
      }
      this.live.add(runtime);
      previous.retire();
      await this.followSpool(runtime, true);
      this.forgetIdle();
      // Sessions that logged in as a user who is gone or whose password changed end now.
      const ended = this.guard.endStale((login) => runtime.user(login.user)?.password.id === login.passwordId);
      if (ended > 0) this.logger.info({ sessions: ended }, 'closed sessions whose login was changed or removed');
      for (const warning of config.warnings) this.logger.warn({ config: config.file }, warning);
      this.warnIfInsecure(config);
      if (changes.needsRestart.length > 0) this.logger.warn({ settings: changes.needsRestart }, 'these settings change only after a restart');
      this.logger.info({ reason, ...changes, ms: Date.now() - started }, 'reloaded');
      this.metrics.declare(config.users);
      this.metrics.config(runtime.fingerprint);
      this.metrics.reload('ok');
      this.lastReload = { at: Date.now(), ok: true, reason, problems: [] };
      return { ok: true, problems: [], files: this.watchedFiles() };
    } catch (err) {
      const problems =
        err instanceof ConfigError ? [...err.problems] : err instanceof RuntimeBuildError ? err.failures.map((f) => f.message) : [String((err as Error)?.message ?? err)];
      // A file deleted or mid-replace is worth a warning; a file that is wrong is an error.
      const missing = problems.every((p) => /not found|cannot read/.test(p));
      this.logger[missing ? 'warn' : 'error']({ reason, problems, ms: Date.now() - started }, 'reload failed; the last good config keeps serving');
      this.metrics.reload('failed');
      this.lastReload = { at: Date.now(), ok: false, reason, problems };
      return { ok: false, problems, files: this.watchedFiles() };
    }
  }

  /** Closes every part in reverse order of start; calling it again returns the same promise. */
  close(): Promise<void> {
    this.closed ??= (async () => {
      this.closing = true;
      this.logger.info('shutting down: no new connections, waiting for messages in flight');
      await this.lifecycle.close();
      this.logger.info('stopped');
    })();
    return this.closed;
  }

  /** Starts the listener and, with tls.implicit, the implicit-TLS one (a failure closes the first again). */
  private async listen(): Promise<void> {
    const { config } = this.current;
    const listenOn = (server: SMTPServer, { host, port }: { host: string; port: number }): Promise<void> =>
      new Promise<void>((resolve, reject) => {
        server.server.once('error', reject);
        server.listen(port, host, () => {
          server.server.off('error', reject);
          resolve();
        });
      });
    await listenOn(this.server, config.listen);
    if (this.implicitServer && config.tls?.implicit) {
      try {
        await listenOn(this.implicitServer, config.tls.implicit);
      } catch (err) {
        await new Promise<void>((resolve) => this.server.close(() => resolve()));
        throw err;
      }
    }
  }

  /** Stops accepting, waits for in-flight messages (up to the grace period), then closes the connections left. */
  private async closeListener(): Promise<void> {
    const serversClosed = Promise.all(this.servers.map((server) => new Promise<void>((resolve) => server.close(() => resolve()))));
    const drained = await this.drain(this.options.shutdownGraceMs ?? 30_000);
    if (!drained) this.logger.warn('messages still in flight after the shutdown grace period: closing their connections');
    for (const server of this.servers) {
      for (const connection of server.connections) {
        connection.send(421, new SmtpMuxError('SMTPMUX_SHUTTING_DOWN').message);
        connection.close();
      }
    }
    await serversClosed;
  }

  /** Resolves true once no Runtime has a message in flight, false when `graceMs` passed first. */
  private async drain(graceMs: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const expired = new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), graceMs)));
    try {
      // A message that began while we waited keeps the drain going: look again after each wait.
      for (let busy = [...this.live].filter((r) => r.busy); busy.length > 0; busy = [...this.live].filter((r) => r.busy)) {
        const idle = await Promise.race([Promise.all(busy.map((r) => r.idle())).then(() => true as const), expired]);
        if (!idle) return false;
      }
      return true;
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Opens the spool the config asks for, once: at start (a failure stops the start) or at the first
   * reload that asks for one (a failure is logged). Moving it to another folder needs a restart.
   */
  private async followSpool(runtime: Runtime, reloading = false): Promise<void> {
    const wanted = runtime.config.spool;
    if (!wanted) return;
    if (this.spoolPart) {
      if (this.spoolPart.config.dir !== wanted.dir) this.logger.warn({ dir: this.spoolPart.config.dir, configured: wanted.dir }, 'spool.dir changes only after a restart');
      return;
    }
    try {
      this.spoolPart = await Spool.open(wanted, { current: () => this.current, logger: this.logger, metrics: this.metrics, closing: () => this.closing });
      this.spoolPart.start();
    } catch (err) {
      if (!reloading) throw err;
      this.logger.error({ dir: wanted.dir, err: (err as Error).message }, 'the spool could not be opened; messages are not queued');
    }
  }

  private forgetIdle(): void {
    for (const runtime of this.live) if (runtime !== this.current && !runtime.busy) this.live.delete(runtime);
  }
}
