// A message body received once and replayed per delivery attempt. Small bodies stay in memory as one
// Buffer. A larger one stays in memory too while a shared budget (BodyMemory) has room for it, so a few
// large messages at a time never touch the disk; past the budget the bytes go to a private temp file,
// so many large concurrent messages do not fill memory. Each attempt reads a fresh stream of the same
// bytes. The header block is kept aside (bounded) so the selector can be told the subject.
import { promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Writable, type Readable } from 'node:stream';
import { finished } from 'node:stream/promises';

export const SPILL_THRESHOLD = 256 * 1024;
const MAX_HEADER_BYTES = 64 * 1024;
/**
 * Bytes gathered before one write to the spill file. Writes of 64 KB (what a socket delivers) cost two
 * to three times as much per byte as writes of 256 KB here; a spilling body holds two such buffers.
 */
export const SPILL_BATCH_BYTES = 128 * 1024;
/** The default BodyMemory budget: what bodies above SPILL_THRESHOLD may hold in memory together. */
export const BODY_MEMORY_BYTES = 24 * 1024 * 1024;

/**
 * What bodies larger than SPILL_THRESHOLD may hold in memory together, shared by every message of one
 * server. A body that does not fit (or is larger than a quarter of the budget) spills to disk.
 */
export class BodyMemory {
  private used = 0;

  constructor(readonly limit: number = BODY_MEMORY_BYTES) {}

  /** Reserves `bytes`; false (and nothing reserved) when they do not fit. */
  take(bytes: number): boolean {
    if (this.used + bytes > this.limit) return false;
    this.used += bytes;
    return true;
  }

  give(bytes: number): void {
    this.used = Math.max(0, this.used - bytes);
  }

  get inUse(): number {
    return this.used;
  }
}

export class MessageBody {
  private constructor(
    readonly size: number,
    readonly headerBlock: string,
    private readonly memory: Buffer | undefined,
    private readonly file: string | undefined,
    /** Bytes this body holds of `budget`, given back by dispose(). */
    private reserved: number,
    private readonly budget: BodyMemory | undefined,
    /** False for a file someone else keeps (the spool's): dispose() leaves it. */
    private readonly ownsFile = true,
  ) {}

  /** A body already stored in a file that outlives it (a spooled message): replayed, never removed. */
  static fromFile(file: string, size: number, headerBlock: string): MessageBody {
    return new MessageBody(size, headerBlock, undefined, file, 0, undefined, false);
  }

  /**
   * Reads a DATA stream to its end. Bytes beyond `maxSize` are counted but not stored: the caller
   * answers 552 after the stream is drained, as SMTP requires. Without `memory`, every body above the
   * spill threshold spills.
   */
  static async receive(
    stream: Readable,
    options: {
      maxSize: number;
      spillThreshold?: number;
      tmpDir?: string;
      memory?: BodyMemory;
      /** The size the client declared (MAIL FROM ... SIZE=): a body declared too large for `memory` spills from the threshold on. */
      declaredSize?: number;
    },
  ): Promise<MessageBody> {
    const threshold = options.spillThreshold ?? SPILL_THRESHOLD;
    const budget = options.declaredSize !== undefined && options.memory && options.declaredSize > options.memory.limit / 4 ? undefined : options.memory;
    /** Bytes of `budget` this body holds. */
    let reserved = 0;
    const keepInMemory = (): boolean => {
      if (stored <= threshold) return true;
      // Past the threshold: the whole body so far, then each chunk, must fit the budget.
      const needed = stored - reserved;
      if (needed <= 0) return true;
      if (!budget || stored > budget.limit / 4 || !budget.take(needed)) return false;
      reserved += needed;
      return true;
    };
    const release = (): void => {
      budget?.give(reserved);
      reserved = 0;
    };
    const chunks: Buffer[] = [];
    /**
     * A body whose declared SIZE= fits the budget is copied into one block of that size as it arrives:
     * no concatenation at the end, and each received chunk dies young. Should more arrive than
     * declared, the block becomes the first of `chunks`.
     */
    let block: Buffer | undefined;
    let filled = 0;
    const declared = options.declaredSize ?? 0;
    if (budget && declared > threshold && declared <= budget.limit / 4 && declared <= options.maxSize && budget.take(declared)) {
      reserved = declared;
      block = Buffer.allocUnsafe(declared);
    }
    const endBlock = (): void => {
      if (block) chunks.unshift(block.subarray(0, filled));
      block = undefined;
    };
    let size = 0;
    let stored = 0;
    let header: Buffer | undefined;
    let headerParts: Buffer[] = [];
    let headerSize = 0;
    let spill: SpillFile | undefined;
    /** The spill step in progress, so a failed receive can wait for it before cleaning up. */
    let spilling: Promise<void> | undefined;

    const sink = new Writable({
      write: (chunk: Buffer, _encoding, done) => {
        size += chunk.length;
        if (header === undefined) {
          headerParts.push(chunk);
          headerSize += chunk.length;
          // Nearly always the header block ends in the first chunk: looked for there, without a copy.
          const joined = headerParts.length === 1 ? chunk : Buffer.concat(headerParts);
          const end = headerEnd(joined);
          if (end >= 0 || headerSize >= MAX_HEADER_BYTES) {
            header = joined.subarray(0, end >= 0 ? end : MAX_HEADER_BYTES);
            headerParts = [];
          } else {
            headerParts = [joined];
          }
        }
        if (size > options.maxSize) return done();
        stored += chunk.length;
        if (!spill && keepInMemory()) {
          if (block && filled + chunk.length <= block.length) filled += chunk.copy(block, filled);
          else {
            endBlock();
            chunks.push(chunk);
          }
          return done();
        }
        if (spill) {
          const wait = spill.write(chunk);
          if (!wait) return done();
          spilling = wait;
          return void wait.then(() => done(), done);
        }
        spilling = (async () => {
          spill = await SpillFile.create(options.tmpDir ?? os.tmpdir());
          endBlock();
          for (const early of chunks.splice(0)) await spill.write(early);
          release(); // the bytes held so far are in the file now
          await spill.write(chunk);
        })();
        spilling.then(() => done(), done);
      },
      final: (done) => {
        if (!spill) return done();
        spill.close().then(() => done(), done);
      },
    });

    // pipe + finished rather than stream.pipeline: pipeline builds and aborts an AbortController per
    // call, whose DOMException cost about 4% of the proxy's CPU per message in a profile.
    stream.pipe(sink);
    try {
      await Promise.all([finished(stream), finished(sink)]);
    } catch (err) {
      stream.unpipe(sink);
      sink.destroy();
      // The client went away mid-DATA: finish what was in flight, then leave no file and no fd behind.
      await spilling?.catch(() => undefined);
      await (spill as SpillFile | undefined)?.discard();
      release();
      throw err;
    }
    const headerText = (header ?? Buffer.concat(headerParts)).toString('utf8');
    const file = (spill as SpillFile | undefined)?.file;
    endBlock();
    const memory = file ? undefined : chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, stored);
    return new MessageBody(size, headerText, memory, file, reserved, budget);
  }

  /** True when more bytes arrived than the limit allowed: the body is incomplete and must not be sent. */
  exceeds(limit: number): boolean {
    return this.size > limit;
  }

  /**
   * The bytes for one delivery attempt: the Buffer, or the temp file's path, which the downstream pool
   * opens afresh for every try (so a retried attempt reads the whole body again).
   */
  open(): Buffer | { readonly path: string } {
    return this.memory ?? { path: this.file as string };
  }

  get spilled(): boolean {
    return this.file !== undefined;
  }

  /** Gives back its share of the memory budget and removes the temp file, if any (never a file from fromFile). Safe to call more than once. */
  async dispose(): Promise<void> {
    this.budget?.give(this.reserved);
    this.reserved = 0;
    if (this.file && this.ownsFile) await fs.rm(path.dirname(this.file), { recursive: true, force: true });
  }
}

/** Index of the blank line that ends the header block, or -1. */
function headerEnd(buf: Buffer): number {
  const crlf = buf.indexOf('\r\n\r\n');
  const lf = buf.indexOf('\n\n');
  if (crlf >= 0 && (lf < 0 || crlf <= lf)) return crlf;
  return lf;
}

/**
 * The private temp file a large body spills to. Chunks are copied into one of two batch buffers of
 * SPILL_BATCH_BYTES: one is written while the other fills, and the writer waits only when the second is
 * full before the first is on disk. Copying lets each received chunk die young (cheap to collect) and
 * keeps what a spilling body holds to the two buffers.
 */
class SpillFile {
  private filling = Buffer.allocUnsafe(SPILL_BATCH_BYTES);
  private spare = Buffer.allocUnsafe(SPILL_BATCH_BYTES);
  private used = 0;
  /** The write of `spare`; never left unhandled (a rejection surfaces at the next wait). */
  private inFlight: Promise<void> = Promise.resolve();

  private constructor(
    readonly file: string,
    private readonly handle: FileHandle,
  ) {}

  static async create(tmpDir: string): Promise<SpillFile> {
    const dir = await fs.mkdtemp(path.join(tmpDir, 'smtpmux-'));
    const file = path.join(dir, 'message.eml');
    try {
      return new SpillFile(file, await fs.open(file, 'wx', 0o600));
    } catch (err) {
      await fs.rm(dir, { recursive: true, force: true });
      throw err;
    }
  }

  /** Takes a chunk; returns a promise to wait for when the writer must slow down, else undefined. */
  write(chunk: Buffer): Promise<void> | undefined {
    const copied = chunk.copy(this.filling, this.used);
    this.used += copied;
    if (this.used < this.filling.length) return undefined;
    return this.writeRest(chunk, copied);
  }

  private async writeRest(chunk: Buffer, from: number): Promise<void> {
    let at = from;
    for (;;) {
      await this.flush();
      if (at >= chunk.length) return;
      this.used = chunk.copy(this.filling, 0, at);
      at += this.used;
      if (this.used < this.filling.length) return;
    }
  }

  /** Once the last batch is on disk, starts writing this one and fills the other buffer next. */
  private async flush(): Promise<void> {
    await this.inFlight;
    const batch = this.filling.subarray(0, this.used);
    this.inFlight = writeAll(this.handle, batch);
    this.inFlight.catch(() => undefined);
    [this.filling, this.spare] = [this.spare, this.filling];
    this.used = 0;
  }

  /** Writes what is left and closes the file. */
  async close(): Promise<void> {
    try {
      if (this.used > 0) await this.flush();
      await this.inFlight;
    } finally {
      await this.handle.close();
    }
  }

  /** Closes and removes the file after a failed receive. */
  async discard(): Promise<void> {
    await this.inFlight.catch(() => undefined);
    await this.handle.close().catch(() => undefined);
    await fs.rm(path.dirname(this.file), { recursive: true, force: true });
  }
}

/** Writes until every byte is written (a file write may be short). */
async function writeAll(handle: FileHandle, bytes: Buffer): Promise<void> {
  for (let at = 0; at < bytes.length; ) {
    const { bytesWritten } = await handle.write(bytes, at, bytes.length - at);
    at += bytesWritten;
  }
}
