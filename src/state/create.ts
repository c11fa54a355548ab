// Picks the state backend from the config: in process by default, Redis (behind the local fallback)
// when `state.redis` is set. The one place that imports a backend; everything else sees a StateStore.
// The Redis backend (node-redis and its modules, ~12 MB of heap) is loaded only when a config asks for it.
import type { StateConfig } from '../config/load';
import type { Logger } from '../observe/logger';
import { FallbackStateStore, type FallbackOptions } from './fallback';
import { MemoryStateStore } from './memory';
import type { StateStore } from './store';

/** Creates the store; with Redis, waits at most one call deadline for the first connection, then starts degraded. */
export async function createStateStore(config: StateConfig, logger: Logger, fallback?: FallbackOptions): Promise<StateStore> {
  if (!config.redis) return new MemoryStateStore();
  const { RedisStateStore } = await import('./redis');
  let lastError = '';
  let store: FallbackStateStore | undefined;
  const redis = RedisStateStore.create({ url: config.redis, prefix: config.prefix, timeoutMs: config.timeoutMs }, (err) => {
    store?.connectionLost(err.message);
    // The client retries with backoff on its own; log each distinct failure once, not once per retry.
    if (err.message === lastError) return;
    lastError = err.message;
    logger.debug({ err: err.message }, 'state: Redis connection error');
  });
  store = new FallbackStateStore(redis, logger, fallback);
  await store.start(Math.max(config.timeoutMs, 1000));
  if (!store.status().degraded) logger.info({ server: describeServer(config.redis), prefix: config.prefix }, 'state: shared on Redis');
  return store;
}

/** host:port/db of a Redis URL, without any credential it holds. */
export function describeServer(url: string): string {
  try {
    const u = new URL(url);
    return `${u.protocol}//${u.host}${u.pathname && u.pathname !== '/' ? u.pathname : ''}`;
  } catch {
    return '(unparsable URL)';
  }
}
