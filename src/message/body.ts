// A message body received once and replayed per delivery attempt. Small bodies stay in memory as one
// Buffer; past the spill threshold the bytes go to a private temp file, so many large concurrent
// messages do not fill the heap. Each attempt reads a fresh stream of the same bytes. The header block
// is kept aside (bounded) so the selector can be told the subject.
import { createWriteStream, promises as fs, type WriteStream } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Writable, type Readable } from 'node:stream';
import { finished } from 'node:stream/promises';

export const SPILL_THRESHOLD = 1024 * 1024;
const MAX_HEADER_BYTES = 64 * 1024;

export class MessageBody {
  private constructor(
    readonly size: number,
    readonly headerBlock: string,
    private readonly memory: Buffer | undefined,
    private readonly file: string | undefined,
  ) {}

  /**
   * Reads a DATA stream to its end. Bytes beyond `maxSize` are counted but not stored: the caller
   * answers 552 after the stream is drained, as SMTP requires.
   */
  static async receive(stream: Readable, options: { maxSize: number; spillThreshold?: number; tmpDir?: string }): Promise<MessageBody> {
    const threshold = options.spillThreshold ?? SPILL_THRESHOLD;
    const chunks: Buffer[] = [];
    let size = 0;
    let stored = 0;
    let header: Buffer | undefined;
    let headerParts: Buffer[] = [];
    let headerSize = 0;
    let dir: string | undefined;
    let file: string | undefined;
    let out: WriteStream | undefined;
    /** The spill in progress, so a failed receive can wait for it before cleaning up. */
    let spilling: Promise<void> | undefined;

    let outError: Error | undefined;
    // One listener pair per wait, removed when it settles: a 10 MB body waits for 'drain' hundreds of
    // times, and an 'error' with no listener would crash the process.
    const writeToFile = (chunk: Buffer): Promise<void> =>
      new Promise((resolve, reject) => {
        const stream = out as WriteStream;
        if (outError) return reject(outError);
        if (stream.write(chunk)) return resolve();
        const onDrain = (): void => {
          stream.off('error', onError);
          resolve();
        };
        const onError = (err: Error): void => {
          stream.off('drain', onDrain);
          reject(err);
        };
        stream.once('drain', onDrain);
        stream.once('error', onError);
      });

    const sink = new Writable({
      write: (chunk: Buffer, _encoding, done) => {
        size += chunk.length;
        if (header === undefined) {
          headerParts.push(chunk);
          headerSize += chunk.length;
          const joined = Buffer.concat(headerParts);
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
        if (!out && stored <= threshold) {
          chunks.push(chunk);
          return done();
        }
        const spill = async (): Promise<void> => {
          if (!out) {
            dir = await fs.mkdtemp(path.join(options.tmpDir ?? os.tmpdir(), 'smtpmux-'));
            file = path.join(dir, 'message.eml');
            out = createWriteStream(file, { mode: 0o600 });
            out.on('error', (err) => (outError ??= err));
            for (const early of chunks.splice(0)) await writeToFile(early);
          }
          await writeToFile(chunk);
        };
        spilling = spill();
        spilling.then(() => done(), done);
      },
      final: (done) => {
        if (!out) return done();
        out.end(done);
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
      out?.destroy();
      if (dir) await fs.rm(dir, { recursive: true, force: true });
      throw err;
    }
    const headerText = (header ?? Buffer.concat(headerParts)).toString('utf8');
    return new MessageBody(size, headerText, out ? undefined : Buffer.concat(chunks), file);
  }

  /** True when more bytes arrived than the limit allowed: the body is incomplete and must not be sent. */
  exceeds(limit: number): boolean {
    return this.size > limit;
  }

  /**
   * The bytes for one delivery attempt: the Buffer, or the temp file's path, which nodemailer opens
   * afresh for every read (so a requeued attempt reads the whole body again).
   */
  open(): Buffer | { readonly path: string } {
    return this.memory ?? { path: this.file as string };
  }

  get spilled(): boolean {
    return this.file !== undefined;
  }

  /** Removes the temp file, if any. Safe to call more than once. */
  async dispose(): Promise<void> {
    if (this.file) await fs.rm(path.dirname(this.file), { recursive: true, force: true });
  }
}

/** Index of the blank line that ends the header block, or -1. */
function headerEnd(buf: Buffer): number {
  const crlf = buf.indexOf('\r\n\r\n');
  const lf = buf.indexOf('\n\n');
  if (crlf >= 0 && (lf < 0 || crlf <= lf)) return crlf;
  return lf;
}
