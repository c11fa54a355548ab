// `smtpmux queue list|show|retry|drop`: looks at and acts on the spool of the config's `spool.dir`,
// also while `serve` runs (SQLite in WAL mode lets two processes share it; the server notices a retry
// at its next poll).
import { createReadStream, promises as fs } from 'node:fs';
import { once } from 'node:events';
import { parseArgs } from 'node:util';
import { loadConfig } from '../config/load';
import { roughDuration } from '../rough-duration';
import { describeLoadFailure } from '../runtime';
import { DEFAULT_QUEUE } from '../spool/spool';
import { SpoolStore, type SpoolEntry } from '../spool/store';

export const QUEUE_USAGE = `Usage: smtpmux queue <list|show|retry|drop> [options]

  queue list [--dead] [--json]   queued messages (or the dead letter), oldest first
  queue show ID [--body]         one message: envelope, state, attempts, last error and headers
                                 (the body only with --body)
  queue retry ID | --all         retry a queued or dead message now (--all: every queued one)
  queue drop ID                  delete a message, queued or dead, for good

Options:
  -c, --config PATH   config file (default: $SMTPMUX_CONFIG or config/config.yaml); its spool.dir is used`;

type Out = { log(text: string): void; error(text: string): void };

export async function runQueue(argv: readonly string[], out: Out = console): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: [...argv],
      allowPositionals: true,
      options: {
        config: { type: 'string', short: 'c' },
        dead: { type: 'boolean', default: false },
        json: { type: 'boolean', default: false },
        body: { type: 'boolean', default: false },
        all: { type: 'boolean', default: false },
      },
    });
  } catch (err) {
    out.error(`smtpmux queue: ${(err as Error).message}\n\n${QUEUE_USAGE}`);
    return 2;
  }
  const { values, positionals } = parsed;
  const [action, id] = positionals;
  if (!action || !['list', 'show', 'retry', 'drop'].includes(action)) {
    out.error(`smtpmux queue: ${action ? `unknown action "${action}"` : 'name an action'}\n\n${QUEUE_USAGE}`);
    return 2;
  }
  const needsId = action === 'show' || action === 'drop' || (action === 'retry' && !values.all);
  if (needsId && !id) {
    out.error(`smtpmux queue ${action}: give a message id (from "smtpmux queue list")`);
    return 2;
  }
  if (id !== undefined && !SpoolStore.isId(id)) {
    out.error(`smtpmux queue ${action}: "${id}" is not a message id`);
    return 2;
  }

  const configPath = values.config ?? process.env.SMTPMUX_CONFIG ?? 'config/config.yaml';
  let config;
  try {
    config = await loadConfig(configPath);
  } catch (err) {
    out.error(`smtpmux: ${describeLoadFailure(err) ?? (err as Error).message}`);
    return 1;
  }
  if (!config.spool) {
    out.error(`smtpmux queue: ${config.file} has no spool (add a "spool:" section or a user's "queue:")`);
    return 1;
  }
  let store: SpoolStore;
  try {
    store = await SpoolStore.open(config.spool.dir, { serving: false });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      if (action === 'list') {
        out.log(values.json ? '[]' : `nothing queued: there is no spool in ${config.spool.dir} yet`);
        return 0;
      }
      out.error(`smtpmux queue ${action}: no message ${id} (there is no spool in ${config.spool.dir} yet)`);
      return 1;
    }
    out.error(`smtpmux queue: cannot open the spool in ${config.spool.dir}: ${(err as Error).message}`);
    return 1;
  }
  try {
    switch (action) {
      case 'list':
        return list(store, values.dead, values.json, out);
      case 'show':
        return await show(store, id, values.body, out);
      case 'retry': {
        if (values.all) {
          out.log(`${store.retryAll()} queued message(s) will be retried at the server's next poll`);
          return 0;
        }
        const entry = store.get(id);
        const maxAge = config.users.find((u) => u.email.toLowerCase() === entry?.user.toLowerCase())?.queue?.maxAgeMs ?? DEFAULT_QUEUE.maxAgeMs;
        if (!entry || !store.retry(id, Date.now(), maxAge)) {
          out.error(`smtpmux queue retry: no message ${id}`);
          return 1;
        }
        out.log(entry.state === 'dead' ? `${id} is queued again (out of the dead letter) and will be retried at the server's next poll` : `${id} will be retried at the server's next poll`);
        return 0;
      }
      default: {
        if (!(await store.drop(id))) {
          out.error(`smtpmux queue drop: no message ${id}`);
          return 1;
        }
        out.log(`${id} dropped`);
        return 0;
      }
    }
  } finally {
    store.close();
  }
}

const age = (ms: number): string => roughDuration(ms, { seconds: 's', minutes: 'm', hours: 'h', days: 'd' });

function list(store: SpoolStore, dead: boolean, json: boolean, out: Out): number {
  const entries = store.list(dead ? 'dead' : 'queued');
  if (json) {
    out.log(JSON.stringify(entries.map(({ headers: _headers, ...entry }) => entry), null, 2));
    return 0;
  }
  const stats = store.stats();
  if (entries.length === 0) {
    out.log(dead ? 'the dead letter is empty' : `nothing queued (${stats.dead} in the dead letter)`);
    return 0;
  }
  const now = Date.now();
  const rows = entries.map((e) => [
    e.id,
    e.user,
    e.envelope.from || '<>',
    String(e.envelope.to.length),
    String(e.size),
    age(now - e.queuedAt),
    String(e.attempts),
    dead ? (e.deadReason ?? '') : e.inFlightSince ? 'now' : e.nextAt <= now ? 'due' : `in ${age(e.nextAt - now)}`,
    e.lastError.slice(0, 80),
  ]);
  const header = ['ID', 'USER', 'FROM', 'RCPTS', 'BYTES', 'AGE', 'ATTEMPTS', dead ? 'WHY DEAD' : 'NEXT', 'LAST ERROR'];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  for (const row of [header, ...rows]) out.log(row.map((cell, i) => (i === row.length - 1 ? cell : cell.padEnd(widths[i]))).join('  '));
  out.log(`${entries.length} message(s)${dead ? ' in the dead letter' : ' queued'}; spool holds ${stats.queued} queued, ${stats.dead} dead, ${stats.bytes} bytes`);
  return 0;
}

function describe(e: SpoolEntry): string[] {
  const at = (ms: number | null): string => (ms === null ? '-' : new Date(ms).toISOString());
  return [
    `id:          ${e.id}`,
    `state:       ${e.state}${e.state === 'dead' ? ` (${e.deadReason}, ${at(e.deadAt)})` : ''}`,
    `user:        ${e.user}`,
    `from:        ${e.envelope.from || '<>'}`,
    `to:          ${e.envelope.to.join(', ')}`,
    `size:        ${e.size} bytes`,
    `client:      ${e.clientAddress}`,
    `queued:      ${at(e.queuedAt)}`,
    `expires:     ${at(e.expiresAt)}`,
    `attempts:    ${e.attempts}`,
    ...(e.state === 'queued' ? [`next retry:  ${e.inFlightSince ? 'in progress' : at(e.nextAt)}`] : []),
    `last error:  ${e.lastError}`,
  ];
}

async function show(store: SpoolStore, id: string, withBody: boolean, out: Out): Promise<number> {
  const entry = store.get(id);
  if (!entry) {
    out.error(`smtpmux queue show: no message ${id}`);
    return 1;
  }
  for (const line of describe(entry)) out.log(line);
  out.log('');
  out.log(entry.headers.replace(/\r\n/g, '\n').trimEnd());
  if (!withBody) return 0;
  out.log('');
  // The whole message, streamed: a 20 MB body is never read into memory at once.
  const file = store.bodyPath(id);
  await fs.access(file);
  const stream = createReadStream(file);
  stream.pipe(process.stdout, { end: false });
  await once(stream, 'end');
  return 0;
}
