// The lifecycle: start-up is the first reload, shutdown the last. Everything that opens a resource
// closes it here, in reverse order: stop accepting, let in-flight messages finish, close pools and
// isolates.
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import type { SMTPServer } from 'smtp-server';
import { loadConfig, ConfigError, type Env } from './config/load';
import { SmtpMuxError } from './errors';
import { createLogger, type Logger } from './observe/logger';
import { Runtime, RuntimeBuildError } from './runtime';
import { createInboundServer } from './smtp/server';
import { createStateStore } from './state/create';
import type { StateStore } from './state/store';

export interface AppOptions {
  readonly configPath: string;
  readonly env?: Env;
  readonly logger?: Logger;
  /** Where large message bodies spill. */
  readonly tmpDir?: string;
  /** How long shutdown waits for in-flight messages before closing connections. */
  readonly shutdownGraceMs?: number;
}

export interface ReloadResult {
  readonly ok: boolean;
  readonly problems: readonly string[];
  /** What a watcher should watch from now on: the config and every selector it names. */
  readonly files: readonly string[];
}

export class App {
  private closing = false;
  private reloading: Promise<unknown> = Promise.resolve();
  private readonly live = new Set<Runtime>();
  /** Selectors named by the last config that parsed, good or not, so fixing them triggers a reload. */
  private attemptedSelectors: readonly string[] = [];

  private constructor(
    private readonly options: AppOptions,
    readonly logger: Logger,
    private current: Runtime,
    private readonly server: SMTPServer,
    /** Cooldowns, rates, quotas, login penalties and ctx.state: created once, outliving reloads. */
    readonly state: StateStore,
  ) {
    this.live.add(current);
  }

  /** Loads the config, compiles every selector and starts listening; rejects with ConfigError or RuntimeBuildError. */
  static async start(options: AppOptions): Promise<App> {
    const logger = options.logger ?? createLogger();
    const started = Date.now();
    const config = await loadConfig(options.configPath, options.env);
    const state = await createStateStore(config.state, logger);
    let built: Awaited<ReturnType<typeof Runtime.build>>;
    try {
      built = await Runtime.build(config);
    } catch (err) {
      await state.close();
      throw err;
    }
    const { runtime } = built;
    let app: App | undefined;
    const server = createInboundServer(
      { current: () => app?.current ?? runtime, logger, closing: () => app?.closing ?? false, tmpDir: options.tmpDir },
      runtime,
    );
    app = new App(options, logger, runtime, server, state);
    server.on('error', (err) => logger.error({ err: err.message }, 'SMTP server error'));
    await new Promise<void>((resolve, reject) => {
      server.server.once('error', reject);
      server.listen(config.listen.port, config.listen.host, () => {
        server.server.off('error', reject);
        resolve();
      });
    }).catch(async (err: unknown) => {
      await state.close();
      throw err;
    });
    for (const warning of config.warnings) logger.warn({ config: config.file }, warning);
    if (!config.allowInsecureAuth) {
      logger.warn('allow_insecure_auth is off and TLS is not configured: clients cannot log in until allow_insecure_auth: true (or USE_INSECURE_AUTH=true)');
    }
    logger.info(
      { host: config.listen.host, port: app.port, config: config.file, users: runtime.userEmails.length, ms: Date.now() - started },
      'SMTP Mux listening',
    );
    return app;
  }

  get port(): number {
    return (this.server.server.address() as AddressInfo).port;
  }

  /** The config file and every selector the running and the last attempted config name. */
  watchedFiles(): string[] {
    const selectors = [...this.current.config.users.map((u) => u.selectorPath), ...this.attemptedSelectors];
    return [...new Set([path.resolve(this.options.configPath), ...selectors])].sort();
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
      const { runtime, changes } = await Runtime.build(config, this.current);
      const previous = this.current;
      this.current = runtime;
      // smtp-server advertises SIZE and checks MAIL FROM's SIZE= from its options: keep them in step.
      (this.server.options as { size?: number }).size = config.maxMessageSize;
      this.live.add(runtime);
      previous.retire();
      this.forgetIdle();
      for (const warning of config.warnings) this.logger.warn({ config: config.file }, warning);
      if (changes.needsRestart.length > 0) this.logger.warn({ settings: changes.needsRestart }, 'these settings change only after a restart');
      this.logger.info({ reason, ...changes, ms: Date.now() - started }, 'reloaded');
      return { ok: true, problems: [], files: this.watchedFiles() };
    } catch (err) {
      const problems =
        err instanceof ConfigError ? [...err.problems] : err instanceof RuntimeBuildError ? err.failures.map((f) => f.message) : [String((err as Error)?.message ?? err)];
      // A file deleted or mid-replace is worth a warning; a file that is wrong is an error.
      const missing = problems.every((p) => /not found|cannot read/.test(p));
      this.logger[missing ? 'warn' : 'error']({ reason, problems, ms: Date.now() - started }, 'reload failed; the last good config keeps serving');
      return { ok: false, problems, files: this.watchedFiles() };
    }
  }

  /** Stops accepting, waits for in-flight messages (up to the grace period), then closes everything. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    this.logger.info('shutting down: no new connections, waiting for messages in flight');
    const serverClosed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    const deadline = Date.now() + (this.options.shutdownGraceMs ?? 30_000);
    while ([...this.live].some((r) => r.busy) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 25));
    for (const connection of this.server.connections) {
      connection.send(421, new SmtpMuxError('SMTPMUX_SHUTTING_DOWN').message);
      connection.close();
    }
    await serverClosed;
    await this.reloading;
    this.current.retire();
    await this.state.close();
    this.logger.info('stopped');
  }

  private forgetIdle(): void {
    for (const runtime of this.live) if (runtime !== this.current && !runtime.busy) this.live.delete(runtime);
  }
}
