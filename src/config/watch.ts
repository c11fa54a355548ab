// Hot reload triggers. For now: nothing watched (SIGHUP reloads); the file watcher comes with issue 3.
import type { App } from '../app';

export function watchForReload(_app: App): () => void {
  return () => undefined;
}
