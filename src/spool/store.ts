// The spool on disk: one file per message body (bodies/<id>.eml, written to a temp name, fsynced,
// renamed, folder fsynced) and the schedule in SQLite (spool.sqlite, WAL, synchronous=FULL). The row's
// commit is the moment a message is in our custody: a body file without a row is an unfinished write and
// is removed at recovery. Chosen by measurement (scripts/spool-bench.js, see the README): a 50 KB body
// costs about the same either way, a 5 MB BLOB costs several times a file and must sit whole in memory
// to be bound, while a file is written from the spill file or a stream without holding it.
//
// The server and the `smtpmux queue` commands open the same database: WAL lets them work side by side,
// and the server notices a command's change at its next poll.
import { constants as fsConstants, promises as fs } from 'node:fs';
import path from 'node:path';
import { DatabaseSync, type StatementSync } from 'node:sqlite';

export interface SpoolEnvelope {
  readonly from: string;
  readonly to: readonly string[];
  readonly use8BitMime: boolean;
}

export interface NewEntry {
  readonly id: string;
  readonly user: string;
  readonly envelope: SpoolEnvelope;
  readonly size: number;
  readonly clientAddress: string;
  /** The header block as received (bounded by MessageBody), for `queue show` and the selector's summary. */
  readonly headers: string;
  readonly queuedAt: number;
  readonly expiresAt: number;
  readonly nextAt: number;
  /** Attempts already made (the live one while the client waited counts). */
  readonly attempts: number;
  readonly lastError: string;
}

export type EntryState = 'queued' | 'dead';

export interface SpoolEntry extends NewEntry {
  readonly state: EntryState;
  /** When an attempt started and has not been recorded as ended; set across a crash. */
  readonly inFlightSince: number | null;
  readonly deadReason: string | null;
  readonly deadAt: number | null;
}

/** What the spool holds now: for metrics and `queue list`. */
export interface SpoolStats {
  readonly queued: number;
  readonly dead: number;
  /** Body bytes of every message held, queued and dead. */
  readonly bytes: number;
  /** queued_at of the oldest queued message, or null. */
  readonly oldestQueuedAt: number | null;
}

/** What recovery found when a server opened the spool. */
export interface Recovery {
  /** Attempts that were in progress at a crash: each may have been accepted, and is sent again. */
  readonly interrupted: readonly string[];
  /** Body files without a row (a write that never committed, so never answered 250): removed. */
  readonly orphans: number;
  /** Rows whose body file is missing: moved to the dead letter, never silently dropped. */
  readonly missingBodies: readonly string[];
}

const SCHEMA_VERSION = 1;
const ID = /^[0-9A-Za-z_-]{1,64}$/;

interface Row {
  id: string;
  user: string;
  mail_from: string;
  rcpt: string;
  use8bitmime: number;
  size: number;
  client_address: string;
  headers: string;
  queued_at: number;
  expires_at: number;
  next_at: number;
  attempts: number;
  last_error: string;
  state: EntryState;
  in_flight_since: number | null;
  dead_reason: string | null;
  dead_at: number | null;
}

function toEntry(row: Row): SpoolEntry {
  return {
    id: row.id,
    user: row.user,
    envelope: { from: row.mail_from, to: JSON.parse(row.rcpt) as string[], use8BitMime: row.use8bitmime === 1 },
    size: row.size,
    clientAddress: row.client_address,
    headers: row.headers,
    queuedAt: row.queued_at,
    expiresAt: row.expires_at,
    nextAt: row.next_at,
    attempts: row.attempts,
    lastError: row.last_error,
    state: row.state,
    inFlightSince: row.in_flight_since,
    deadReason: row.dead_reason,
    deadAt: row.dead_at,
  };
}

export class SpoolStore {
  private readonly statements: Record<string, StatementSync>;
  private closed = false;

  private constructor(
    readonly dir: string,
    private readonly db: DatabaseSync,
    /** The serving process's hold on the spool (see open); undefined for a `queue` command. */
    private readonly lock: DatabaseSync | undefined,
  ) {
    this.statements = {
      insert: db.prepare(`INSERT INTO messages (id, user, mail_from, rcpt, use8bitmime, size, client_address, headers, queued_at, expires_at, next_at, attempts, last_error, state)
        VALUES (:id, :user, :mail_from, :rcpt, :use8bitmime, :size, :client_address, :headers, :queued_at, :expires_at, :next_at, :attempts, :last_error, 'queued')`),
      get: db.prepare('SELECT * FROM messages WHERE id = ?'),
      due: db.prepare("SELECT * FROM messages WHERE state = 'queued' AND next_at <= ? AND in_flight_since IS NULL ORDER BY next_at, queued_at LIMIT ?"),
      lease: db.prepare("UPDATE messages SET in_flight_since = ? WHERE id = ? AND state = 'queued' AND in_flight_since IS NULL"),
      remove: db.prepare('DELETE FROM messages WHERE id = ?'),
      reschedule: db.prepare('UPDATE messages SET next_at = ?, attempts = ?, last_error = ?, expires_at = ?, in_flight_since = NULL WHERE id = ?'),
      bury: db.prepare("UPDATE messages SET state = 'dead', dead_reason = ?, dead_at = ?, attempts = ?, last_error = ?, in_flight_since = NULL WHERE id = ?"),
      list: db.prepare('SELECT * FROM messages WHERE state = ? ORDER BY queued_at, id LIMIT ?'),
      stats: db.prepare(
        "SELECT COUNT(*) FILTER (WHERE state = 'queued') AS queued, COUNT(*) FILTER (WHERE state = 'dead') AS dead, COALESCE(SUM(size), 0) AS bytes, MIN(queued_at) FILTER (WHERE state = 'queued') AS oldest FROM messages",
      ),
      retryOne: db.prepare("UPDATE messages SET state = 'queued', next_at = 0, dead_reason = NULL, dead_at = NULL, queued_at = CASE WHEN state = 'dead' THEN ? ELSE queued_at END, expires_at = CASE WHEN state = 'dead' THEN ? ELSE expires_at END WHERE id = ?"),
      retryQueued: db.prepare("UPDATE messages SET next_at = 0 WHERE state = 'queued'"),
      inFlight: db.prepare('SELECT id FROM messages WHERE in_flight_since IS NOT NULL'),
      clearInFlight: db.prepare('UPDATE messages SET in_flight_since = NULL WHERE in_flight_since IS NOT NULL'),
      ids: db.prepare('SELECT id, state FROM messages'),
      nextDue: db.prepare("SELECT MIN(next_at) AS next FROM messages WHERE state = 'queued' AND in_flight_since IS NULL"),
    };
  }

  /**
   * Opens the spool in `dir`. A server opens it `serving`: it creates what is missing and takes the
   * spool for itself, because recovery clears leases and removes unfinished files that another running
   * instance would still be writing; a second server on the same folder is refused. The hold is an
   * exclusive SQLite lock on `lock.sqlite`, which the OS releases when the process dies, even by SIGKILL.
   * A `queue` command opens it without `serving` (and fails with ENOENT when there is no spool yet).
   */
  static async open(dir: string, options: { serving: boolean }): Promise<SpoolStore> {
    const bodies = path.join(dir, 'bodies');
    let lock: DatabaseSync | undefined;
    if (options.serving) {
      await fs.mkdir(bodies, { recursive: true, mode: 0o700 });
      lock = new DatabaseSync(path.join(dir, 'lock.sqlite'));
      try {
        lock.exec(`PRAGMA busy_timeout = 0; PRAGMA locking_mode = EXCLUSIVE; CREATE TABLE IF NOT EXISTS holder (pid INTEGER); DELETE FROM holder; INSERT INTO holder VALUES (${process.pid});`);
      } catch (err) {
        lock.close();
        if ((err as { errcode?: number }).errcode === 5) throw new Error(`another SMTP Mux process serves the spool in ${dir}; each running instance needs its own spool.dir`);
        throw err;
      }
    } else await fs.access(path.join(dir, 'spool.sqlite'), fsConstants.R_OK | fsConstants.W_OK);
    const db = new DatabaseSync(path.join(dir, 'spool.sqlite'));
    try {
      // busy_timeout: the server and a `queue` command may write at the same moment.
      db.exec('PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;');
      const version = (db.prepare('PRAGMA user_version').get() as { user_version: number }).user_version;
      if (version > SCHEMA_VERSION) throw new Error(`the spool in ${dir} was written by a newer SMTP Mux (schema ${version}; this one knows ${SCHEMA_VERSION})`);
      db.exec(`CREATE TABLE IF NOT EXISTS messages (
        id TEXT PRIMARY KEY,
        user TEXT NOT NULL,
        mail_from TEXT NOT NULL,
        rcpt TEXT NOT NULL,
        use8bitmime INTEGER NOT NULL,
        size INTEGER NOT NULL,
        client_address TEXT NOT NULL,
        headers TEXT NOT NULL,
        queued_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        next_at INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        last_error TEXT NOT NULL,
        state TEXT NOT NULL,
        in_flight_since INTEGER,
        dead_reason TEXT,
        dead_at INTEGER
      ) STRICT;
      CREATE INDEX IF NOT EXISTS messages_due ON messages (state, next_at);
      PRAGMA user_version = ${SCHEMA_VERSION};`);
    } catch (err) {
      db.close();
      lock?.close();
      throw err;
    }
    return new SpoolStore(dir, db, lock);
  }

  static isId(id: string): boolean {
    return ID.test(id);
  }

  bodyPath(id: string): string {
    if (!ID.test(id)) throw new Error(`not a spool id: ${JSON.stringify(id)}`);
    return path.join(this.dir, 'bodies', `${id}.eml`);
  }

  /**
   * Makes a message durable: the body file is written (from a Buffer, or linked or copied from a file,
   * never read into memory), fsynced and renamed into place, the folder fsynced, then the row committed.
   * When this resolves, the message survives a crash; when it rejects, nothing of it is left.
   */
  async add(entry: NewEntry, body: Buffer | { readonly path: string }): Promise<void> {
    const final = this.bodyPath(entry.id);
    const tmp = `${final}.tmp`;
    try {
      if (Buffer.isBuffer(body)) {
        const handle = await fs.open(tmp, 'wx', 0o600);
        try {
          await handle.writeFile(body);
          await handle.sync();
        } finally {
          await handle.close();
        }
      } else {
        // A hard link shares the spill file's bytes (no copy); another file system needs a kernel copy.
        await fs.link(body.path, tmp).catch(async (err: NodeJS.ErrnoException) => {
          if (err.code !== 'EXDEV' && err.code !== 'EPERM' && err.code !== 'ENOTSUP') throw err;
          await fs.copyFile(body.path, tmp, fsConstants.COPYFILE_EXCL);
        });
        const handle = await fs.open(tmp, 'r+');
        try {
          await handle.chmod(0o600);
          await handle.sync();
        } finally {
          await handle.close();
        }
      }
      await fs.rename(tmp, final);
      await this.syncFolder();
      this.statements.insert.run({
        id: entry.id,
        user: entry.user,
        mail_from: entry.envelope.from,
        rcpt: JSON.stringify(entry.envelope.to),
        use8bitmime: entry.envelope.use8BitMime ? 1 : 0,
        size: entry.size,
        client_address: entry.clientAddress,
        headers: entry.headers,
        queued_at: entry.queuedAt,
        expires_at: entry.expiresAt,
        next_at: entry.nextAt,
        attempts: entry.attempts,
        last_error: entry.lastError,
      });
    } catch (err) {
      await fs.rm(tmp, { force: true });
      await fs.rm(final, { force: true });
      throw err;
    }
  }

  get(id: string): SpoolEntry | undefined {
    const row = this.statements.get.get(id) as Row | undefined;
    return row && toEntry(row);
  }

  /** Queued messages due by `now`, the longest overdue first (so those due during a downtime go first). */
  due(now: number, limit: number): SpoolEntry[] {
    return (this.statements.due.all(now, limit) as unknown as Row[]).map(toEntry);
  }

  /** When the next queued message is due (ms since the epoch), or null. */
  nextDue(): number | null {
    return (this.statements.nextDue.get() as { next: number | null }).next;
  }

  /**
   * Marks an attempt as started, durably, before anything is sent: a crash from here until
   * delivered()/reschedule()/bury() shows at recovery as an attempt that may have been accepted.
   * False when the message is gone or taken (dropped or retried from the command line meanwhile).
   */
  lease(id: string, now: number): boolean {
    return Number(this.statements.lease.run(now, id).changes) === 1;
  }

  /** A downstream accepted the message: it leaves the spool (row first, then the file). */
  async delivered(id: string): Promise<void> {
    this.statements.remove.run(id);
    await fs.rm(this.bodyPath(id), { force: true });
  }

  reschedule(id: string, change: { nextAt: number; attempts: number; lastError: string; expiresAt: number }): void {
    this.statements.reschedule.run(change.nextAt, change.attempts, change.lastError, change.expiresAt, id);
  }

  /** Moves a message to the dead letter: it stays on disk, listed by `queue list --dead`. */
  bury(id: string, change: { reason: string; at: number; attempts: number; lastError: string }): void {
    this.statements.bury.run(change.reason, change.at, change.attempts, change.lastError, id);
  }

  list(state: EntryState, limit = 1000): SpoolEntry[] {
    return (this.statements.list.all(state, limit) as unknown as Row[]).map(toEntry);
  }

  stats(): SpoolStats {
    const row = this.statements.stats.get() as { queued: number; dead: number; bytes: number; oldest: number | null };
    return { queued: row.queued, dead: row.dead, bytes: row.bytes, oldestQueuedAt: row.oldest };
  }

  /**
   * Makes a message due now; a dead one is queued again, with its age counted from now. False when
   * there is no such message.
   */
  retry(id: string, now: number, maxAgeMs: number): boolean {
    return Number(this.statements.retryOne.run(now, now + maxAgeMs, id).changes) === 1;
  }

  /** Makes every queued message due now (the dead letter stays); returns how many. */
  retryAll(): number {
    return Number(this.statements.retryQueued.run().changes);
  }

  /** Deletes a message, queued or dead, with its body. False when there is no such message. */
  async drop(id: string): Promise<boolean> {
    const removed = Number(this.statements.remove.run(id).changes) === 1;
    if (removed) await fs.rm(this.bodyPath(id), { force: true });
    return removed;
  }

  /**
   * For the server, once, before its first retry: ends what a crash left half done. Interrupted
   * attempts are released (and named, so the log can say a copy may be sent twice), body files without
   * a row are removed, rows without a body go to the dead letter.
   */
  async recover(now: number): Promise<Recovery> {
    const interrupted = (this.statements.inFlight.all() as { id: string }[]).map((r) => r.id);
    this.statements.clearInFlight.run();
    const rows = new Map((this.statements.ids.all() as { id: string; state: EntryState }[]).map((r) => [r.id, r.state]));
    const bodies = path.join(this.dir, 'bodies');
    const files = new Set<string>();
    let orphans = 0;
    for (const name of await fs.readdir(bodies)) {
      const id = name.endsWith('.eml') ? name.slice(0, -4) : undefined;
      if (id !== undefined && rows.has(id)) {
        files.add(id);
        continue;
      }
      await fs.rm(path.join(bodies, name), { force: true, recursive: true });
      orphans++;
    }
    const missingBodies: string[] = [];
    for (const [id, state] of rows) {
      if (files.has(id)) continue;
      missingBodies.push(id);
      if (state === 'queued') this.bury(id, { reason: 'body file missing', at: now, attempts: this.get(id)?.attempts ?? 0, lastError: 'the body file was not found at start-up' });
    }
    if (orphans > 0) await this.syncFolder();
    return { interrupted, orphans, missingBodies };
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.db.close();
    this.lock?.close();
  }

  private async syncFolder(): Promise<void> {
    const handle = await fs.open(path.join(this.dir, 'bodies'), 'r');
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
  }
}
