// The fast paths of dot-stuffing.ts against the dependencies' own code: for every input and every way of
// cutting it into chunks, smtp-server's parser and nodemailer's DataStream give the same bytes with the
// fast path as without it. If a dependency renames what the hooks use, the "hooks are installed" tests
// fail (and the product silently runs the stock code, which stays correct).
import path from 'node:path';
import { Writable } from 'node:stream';
import { fastDataParser, fastStuffingStream, needsStuffing } from '../src/message/dot-stuffing';

// Test-only reach into the dependencies: the classes the hooks are installed on.
// eslint-disable-next-line @typescript-eslint/no-require-imports
const { SMTPStream } = require('smtp-server/lib/smtp-stream') as { SMTPStream: new () => Parser };
// nodemailer's exports map does not list data-stream, so it is loaded by file, next to its entry point.
// eslint-disable-next-line @typescript-eslint/no-require-imports
const DataStream = require(path.join(path.dirname(require.resolve('nodemailer')), 'smtp-connection', 'data-stream.js')) as new () => Stuffer;

interface Parser extends Writable {
  oncommand: (command: Buffer, callback?: () => void) => void;
  startDataMode(): NodeJS.ReadableStream & { byteLength: number };
  continue(): void;
  _feedDataStream: unknown;
}
interface Stuffer extends NodeJS.ReadWriteStream {
  inByteCount: number;
  outByteCount: number;
  _transform: unknown;
  _flush: unknown;
}

/** A seeded generator, so a failure can be replayed. */
function random(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

/** Cuts `bytes` into chunks of random sizes (1 byte up to `max`). */
function cut(bytes: Buffer, rand: () => number, max: number): Buffer[] {
  const chunks: Buffer[] = [];
  for (let at = 0; at < bytes.length; ) {
    const n = 1 + Math.floor(rand() * max);
    chunks.push(bytes.subarray(at, at + n));
    at += n;
  }
  return chunks;
}

const line = 'The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopqrstuvwx\r\n';

/** Message bodies that exercise every rule: dots at line starts, bare CR and LF, 8-bit and binary bytes. */
function bodies(): [string, Buffer][] {
  const rand = random(7);
  const binary = Buffer.from(Array.from({ length: 300_000 }, () => Math.floor(rand() * 256)));
  const text = Buffer.from(line.repeat(4000));
  const dotty = Buffer.from(Array.from({ length: 3000 }, (_, i) => (i % 7 === 0 ? '.' : '') + (i % 11 === 0 ? '..' : '') + line).join(''));
  return [
    ['plain CRLF text', text],
    ['lines starting with dots', dotty],
    ['a body that starts with a dot', Buffer.from('.first\r\n' + line.repeat(2000))],
    ['bare LF line ends', Buffer.from(line.replace('\r\n', '\n').repeat(3000))],
    ['bare CR, and CR LF split anyhow', Buffer.from(('a\rb\r\n.c\r.\r\n' + line).repeat(1500))],
    ['8-bit UTF-8 text', Buffer.from('Grüße aus Köln – 日本語 📨\r\n'.repeat(5000), 'utf8')],
    ['random bytes (binary-ish)', binary],
    ['random bytes in CRLF lines', Buffer.concat(Array.from({ length: 2000 }, (_, i) => Buffer.concat([binary.subarray(i * 100, i * 100 + 76).map((b) => (b === 10 || b === 13 ? 65 : b)), Buffer.from('\r\n')])))],
    ['no final line end', Buffer.from(line.repeat(1000) + 'no newline at the end')],
  ];
}

async function stuff(chunks: Buffer[], fast: boolean): Promise<{ out: Buffer; inBytes: number; outBytes: number }> {
  const stream = new DataStream();
  if (fast) fastStuffingStream(stream);
  const parts: Buffer[] = [];
  stream.on('data', (c: Buffer) => parts.push(c));
  const ended = new Promise((resolve) => stream.on('end', resolve));
  for (const c of chunks) stream.write(c);
  stream.end();
  await ended;
  return { out: Buffer.concat(parts), inBytes: stream.inByteCount, outBytes: stream.outByteCount };
}

/** Feeds wire bytes (DATA content, the final dot, then a command) to a parser in data mode. */
async function unstuff(chunks: Buffer[], fast: boolean): Promise<{ data: Buffer; commands: string[]; byteLength: number }> {
  const parser = new SMTPStream();
  if (fast) fastDataParser(parser);
  const commands: string[] = [];
  parser.oncommand = (command, callback) => {
    commands.push(command.toString('latin1'));
    callback?.();
  };
  const data = parser.startDataMode();
  const parts: Buffer[] = [];
  data.on('data', (c: Buffer) => parts.push(c));
  const ended = new Promise<void>((resolve) => data.on('end', () => resolve()));
  for (const c of chunks) parser.write(c);
  await ended;
  parser.continue();
  await new Promise((resolve) => setImmediate(resolve));
  await new Promise((resolve) => setImmediate(resolve));
  return { data: Buffer.concat(parts), commands, byteLength: data.byteLength };
}

describe('dot-stuffing fast paths', () => {
  test('the hooks are installed on the dependencies’ current classes', () => {
    const parser = new SMTPStream();
    const stockFeed = parser._feedDataStream;
    expect(fastDataParser(parser)._feedDataStream).not.toBe(stockFeed);
    const stream = new DataStream();
    const stockTransform = stream._transform;
    const stockFlush = stream._flush;
    expect(fastStuffingStream(stream)._transform).not.toBe(stockTransform);
    expect(stream._flush).not.toBe(stockFlush);
    // Given once: a second call changes nothing.
    const fastFeed = parser._feedDataStream;
    expect(fastDataParser(parser)._feedDataStream).toBe(fastFeed);
  });

  test('needsStuffing tells a clean chunk from one DataStream would change', () => {
    expect(needsStuffing(Buffer.from(line.repeat(3)), 0x0a)).toBe(false);
    expect(needsStuffing(Buffer.from(line), false)).toBe(false);
    expect(needsStuffing(Buffer.from('.' + line), false)).toBe(true);
    expect(needsStuffing(Buffer.from('.' + line), 0x0a)).toBe(true);
    expect(needsStuffing(Buffer.from('.' + line), 0x41)).toBe(false);
    expect(needsStuffing(Buffer.from('\n' + line), 0x0d)).toBe(true); // conservative: left to DataStream
    expect(needsStuffing(Buffer.from('a' + line), 0x0d)).toBe(true);
    expect(needsStuffing(Buffer.from(line + '.x\r\n'), 0x0a)).toBe(true);
    expect(needsStuffing(Buffer.from('a\nb\r\n'), 0x0a)).toBe(true);
    expect(needsStuffing(Buffer.from('a\rb\r\n'), 0x0a)).toBe(true);
    expect(needsStuffing(Buffer.from(line + 'ends in CR\r'), 0x0a)).toBe(true);
    // Past one 64 KB window: a dot starting the line that starts the next window.
    const long = Buffer.from(line.repeat(1000) + '.dot\r\n' + line.repeat(1000));
    expect(needsStuffing(long, 0x0a)).toBe(true);
    expect(needsStuffing(Buffer.from(line.repeat(2000)), 0x0a)).toBe(false);
  });

  test.each(bodies())('sending (%s): nodemailer’s DataStream gives the same bytes and counts with the fast path', async (_name, body) => {
    const rand = random(body.length);
    for (const max of [7, 1000, 70_000, 2_000_000]) {
      const chunks = cut(body, rand, max);
      const stock = await stuff(chunks, false);
      const fast = await stuff(chunks, true);
      expect(fast.out.equals(stock.out)).toBe(true);
      expect(fast.inBytes).toBe(stock.inBytes);
      expect(fast.outBytes).toBe(stock.outBytes);
    }
  });

  test('a small message that needs no stuffing leaves with its final dot in one chunk (one socket write)', async () => {
    const body = Buffer.from('Subject: hi\r\n\r\n' + line.repeat(30));
    const stream = fastStuffingStream(new DataStream());
    const parts: Buffer[] = [];
    stream.on('data', (c: Buffer) => parts.push(c));
    const ended = new Promise((resolve) => stream.on('end', resolve));
    stream.end(body);
    await ended;
    expect(parts).toHaveLength(1);
    expect(parts[0].equals(Buffer.concat([body, Buffer.from('.\r\n')]))).toBe(true);
  });

  test.each(bodies())('receiving (%s): smtp-server’s parser gives the same data and the next command with the fast path', async (_name, body) => {
    const rand = random(body.length + 1);
    // What a client puts on the wire: the body as nodemailer stuffs it, the final dot, then QUIT.
    const wire = Buffer.concat([(await stuff([body], false)).out, Buffer.from('QUIT\r\n')]);
    for (const max of [5, 1000, 65_536, 2_000_000]) {
      const chunks = cut(wire, rand, max);
      const stock = await unstuff(chunks, false);
      const fast = await unstuff(chunks, true);
      expect(fast.data.equals(stock.data)).toBe(true);
      expect(fast.byteLength).toBe(stock.byteLength);
      expect(fast.commands).toEqual(stock.commands);
      expect(fast.commands).toEqual(['QUIT']);
    }
  });
});
