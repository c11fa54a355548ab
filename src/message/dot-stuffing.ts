// SMTP's DATA transparency (RFC 5321 §4.5.2) on both hops, at wire speed. smtp-server un-dot-stuffs what
// a client sends and nodemailer dot-stuffs (and turns bare CR/LF into CRLF) what we send downstream; both
// do it with a loop over every byte in JavaScript, which was most of the CPU a 5 MB message cost. Most
// chunks of a message need neither: no line in them starts with a dot and every line ends in CRLF. For
// such a chunk the result is the chunk itself, which a native search (Buffer.indexOf, a regular
// expression) proves in a fraction of the time; every other chunk (a stuffed dot, the final dot, a bare
// LF, a CR at a chunk's end) goes to the dependency's own code, unchanged. So the bytes on the wire are
// exactly what the dependencies would produce (tests/dot-stuffing.test.ts compares both), the smuggling
// defences stay theirs, and nothing is patched process-wide: the fast path is set on the parser and
// stuffing-stream instances of our own server (src/smtp/fast-data.ts) and our own downstream connections
// only. If a dependency renames what we hook, the hook finds nothing to hook and the stock code runs (and
// the test says so).
import { PassThrough, type Readable, type Writable } from 'node:stream';

type Done = (err?: Error | null) => void;

// ---------------------------------------------------------------------------------------------------
// Receiving: smtp-server's SMTPStream in data mode.

/** The fields of smtp-server's SMTPStream that its data mode uses (smtp-stream.d.ts declares them). */
interface DataParser extends Writable {
  _dataStream: (Writable & { destroyed: boolean }) | null;
  _atDataStart: boolean;
  _lastBytes: Buffer | false;
  _countDataBytes(len: number): void;
  _feedDataStream(chunk: Buffer, done: Done): void;
}

interface InboundConnection {
  _parser: DataParser | false;
  _createParser(): DataParser;
}

const LF_DOT = Buffer.from('\n.');
/** Parsers, connections and stuffing streams that have the fast path already (it is given once). */
const hooked = new WeakSet<object>();

function isDataParser(parser: unknown): parser is DataParser {
  const p = parser as Partial<DataParser> | null;
  return !!p && typeof p._feedDataStream === 'function' && typeof p._countDataBytes === 'function' && '_lastBytes' in p && '_atDataStart' in p;
}

/**
 * Gives one parser the fast path. Bytes with no "\n." in them (counting the bytes the parser held back
 * from the previous chunk) hold no stuffed dot and no end of data, so smtp-server would emit all of them
 * but the last four, which it keeps to match a terminator split across chunks. A chunk is cut before its
 * first "\n.": the part before goes out here, without a per-byte loop or a copy; the rest (a stuffed dot,
 * the final dot) goes to smtp-server's own _feedDataStream, as if TCP had cut the chunk there. After a
 * stuffed dot smtp-server feeds the remainder back through this method.
 */
export function fastDataParser<T>(parser: T): T {
  if (!isDataParser(parser) || hooked.has(parser)) return parser;
  hooked.add(parser);
  const stock = parser._feedDataStream;
  parser._feedDataStream = function feedDataStream(this: DataParser, chunk: Buffer, done: Done): void {
    const held = this._lastBytes && this._lastBytes.length > 0 ? this._lastBytes : undefined;
    const dataStream = this._dataStream;
    if (
      !dataStream ||
      (this._atDataStart && chunk[0] === 0x2e) ||
      (held !== undefined && (held.indexOf(LF_DOT) !== -1 || (held[held.length - 1] === 0x0a && chunk[0] === 0x2e)))
    ) {
      return stock.call(this, chunk, done);
    }
    const dot = chunk.indexOf(LF_DOT);
    const clean = dot === -1 ? chunk : chunk.subarray(0, dot);
    const rest = dot === -1 ? undefined : chunk.subarray(dot);
    if (clean.length < 8) return stock.call(this, chunk, done);
    const next = rest === undefined ? done : (): void => stock.call(this, rest, done);
    const body = clean.subarray(0, clean.length - 4);
    this._lastBytes = clean.subarray(clean.length - 4);
    this._countDataBytes((held?.length ?? 0) + body.length);
    if (!dataStream.writable) return next();
    if (held) dataStream.write(held);
    if (dataStream.write(body) || dataStream.destroyed) return next();
    // Wait as smtp-server does: for 'drain', or 'close' when the application destroyed the stream.
    const resume = (): void => {
      dataStream.removeListener('drain', resume);
      dataStream.removeListener('close', resume);
      next();
    };
    dataStream.once('drain', resume);
    dataStream.once('close', resume);
  };
  return parser;
}

/**
 * Gives one smtp-server connection the fast path, on its parser and on the fresh parser it makes after
 * STARTTLS. Anything that does not look like smtp-server's connection is left alone.
 */
export function fastDataConnection(connection: unknown): void {
  const conn = connection as Partial<InboundConnection> | null;
  if (!conn || typeof conn._createParser !== 'function' || hooked.has(conn)) return;
  hooked.add(conn);
  const createParser = conn._createParser;
  conn._createParser = () => fastDataParser(createParser.call(conn));
  if (conn._parser) fastDataParser(conn._parser);
}

// ---------------------------------------------------------------------------------------------------
// Sending: nodemailer's DataStream, the Transform between the message and the socket.

/** The fields of nodemailer's DataStream (smtp-connection/data-stream.js) its _transform keeps. */
interface StuffingStream extends Writable {
  inByteCount: number;
  outByteCount: number;
  lastByte: number | false;
  push(chunk: Buffer): boolean;
  _transform(chunk: Buffer | string, encoding: BufferEncoding, done: Done): void;
  _flush(done: Done): void;
}

/** A bare CR (or a CR ending the text), a bare LF (or an LF starting it), or a dot starting a line. */
const NEEDS_STUFFING = /\r(?!\n)|(?<!\r)\n|\n\./;
/** Bytes tested at a time: small strings are cheap to make and to collect, a 5 MB one is not. */
const WINDOW_BYTES = 64 * 1024;

/**
 * False when DataStream would pass `chunk` on unchanged, given the byte before it (`prev`, false at the
 * start); true when it might change something. A chunk is tested in windows that end after an LF, so a
 * window boundary never splits a CRLF.
 */
export function needsStuffing(chunk: Buffer, prev: number | false): boolean {
  if (chunk.length === 0) return false;
  const first = chunk[0];
  if ((prev === 0x0d && first !== 0x0a) || (first === 0x2e && (prev === 0x0a || prev === false))) return true;
  for (let start = 0; start < chunk.length; ) {
    const end = windowEnd(chunk, start);
    // A window after the first starts a line: the one before it ended in LF.
    if (start > 0 && chunk[start] === 0x2e) return true;
    if (NEEDS_STUFFING.test(chunk.toString('latin1', start, end))) return true;
    start = end;
  }
  return false;
}

/** Where the window that starts at `start` ends: after the first LF past WINDOW_BYTES, or at the end. */
function windowEnd(chunk: Buffer, start: number): number {
  if (chunk.length - start <= WINDOW_BYTES) return chunk.length;
  const lf = chunk.indexOf(0x0a, start + WINDOW_BYTES);
  return lf === -1 ? chunk.length : lf + 1;
}

function isStuffingStream(stream: unknown): stream is StuffingStream {
  const s = stream as Partial<StuffingStream> | null;
  return !!s && typeof s._transform === 'function' && typeof s._flush === 'function' && typeof s.inByteCount === 'number' && typeof s.outByteCount === 'number' && 'lastByte' in s;
}

/**
 * The end of data as DataStream's _flush writes it, after the byte the message ended with (false: the
 * message was empty): a line end first unless the message ended with one.
 */
function endOfData(lastByte: number | false): Buffer {
  return Buffer.from(lastByte === 0x0a ? '.\r\n' : lastByte === 0x0d ? '\n.\r\n' : '\r\n.\r\n');
}

/** A clean run at the end of a chunk up to this size is held back, to leave with what comes next. */
const HOLD_MAX_BYTES = 64 * 1024;

/**
 * Gives one nodemailer DataStream the fast path. A chunk is looked at in windows (ending after an LF):
 * runs of windows in which nothing needs stuffing or a line-end repair are passed on as they are, with
 * the counters DataStream keeps; a window that does goes to DataStream's own _transform (which is
 * synchronous and keeps the byte before the next window), as if the chunk had been cut there.
 * A small clean run at the end of a chunk waits for the next chunk or the end of data, so a small
 * message and its final dot go to the socket in one write rather than two.
 */
export function fastStuffingStream<T>(stream: T): T {
  if (!isStuffingStream(stream) || hooked.has(stream)) return stream;
  hooked.add(stream);
  const stock = stream._transform;
  const stockFlush = stream._flush;
  const noop = (): void => undefined;
  /** Counted, not pushed yet. */
  let held: Buffer | undefined;
  const pushHeld = (target: StuffingStream): void => {
    if (held === undefined) return;
    target.push(held);
    held = undefined;
  };
  stream._transform = function transform(this: StuffingStream, chunk: Buffer | string, encoding: BufferEncoding, done: Done): void {
    pushHeld(this);
    if (typeof chunk === 'string' || chunk.length === 0) return stock.call(this, chunk, encoding, done);
    let run = 0; // start of the clean bytes not pushed yet
    const flush = (end: number, hold = false): void => {
      if (end <= run) return;
      const clean = chunk.subarray(run, end);
      this.inByteCount += clean.length;
      this.outByteCount += clean.length;
      this.lastByte = clean[clean.length - 1];
      if (hold && clean.length <= HOLD_MAX_BYTES) held = clean;
      else this.push(clean);
    };
    for (let start = 0; start < chunk.length; ) {
      const end = windowEnd(chunk, start);
      const prev = start === 0 ? this.lastByte : chunk[start - 1];
      if (needsStuffing(chunk.subarray(start, end), prev)) {
        flush(start);
        stock.call(this, chunk.subarray(start, end), encoding, noop);
        run = end;
      }
      start = end;
    }
    flush(chunk.length, true);
    done();
  };
  stream._flush = function flush(this: StuffingStream, done: Done): void {
    if (held === undefined) return stockFlush.call(this, done);
    const end = endOfData(this.lastByte);
    this.outByteCount += end.length;
    this.push(Buffer.concat([held, end]));
    held = undefined;
    done();
  };
  return stream;
}

/**
 * What a message's bytes are handed to nodemailer's SMTPConnection in: a PassThrough that, when the
 * connection pipes it into its DataStream, gives that DataStream the fast path.
 */
class StuffingHandoff extends PassThrough {
  override pipe<D extends NodeJS.WritableStream>(destination: D, options?: { end?: boolean }): D {
    fastStuffingStream(destination);
    return super.pipe(destination, options);
  }
}

/** Bytes per read from a message's stream: fewer, larger chunks for the socket and the stuffing. */
const HANDOFF_HIGH_WATER_MARK = 256 * 1024;

/**
 * A message's bytes (a Buffer, or a stream that is read once) as the stream to give nodemailer's
 * SMTPConnection.send, which dot-stuffs them on the fast path. Destroying the result (the connection
 * does when it closes mid-message) destroys the source stream too, so a file it reads is closed.
 */
export function stuffingSource(body: Buffer | Readable): Readable {
  const output = new StuffingHandoff({ highWaterMark: HANDOFF_HIGH_WATER_MARK });
  if (Buffer.isBuffer(body)) {
    output.end(body);
    return output;
  }
  body.once('error', (err) => output.destroy(err));
  output.once('close', () => body.destroy());
  return body.pipe(output);
}
