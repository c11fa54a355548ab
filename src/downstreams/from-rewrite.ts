// The From rewrite of a downstream with `from:` (providers send only from verified addresses): per
// attempt, the header block gets `From:` set to that address (display name kept) and, unless the message
// has one, a `Reply-To:` carrying the original From. Only the header block changes; every byte after it
// is passed through as received, read afresh from the body for each attempt. The bytes are handled as
// latin1 so that nothing is decoded and re-encoded on the way.
import { createReadStream, promises as fs } from 'node:fs';
import { Readable } from 'node:stream';
import addressparser from 'nodemailer/lib/addressparser';

/** How far into a spilled body the end of the header block is looked for. */
const MAX_HEADER_BYTES = 1024 * 1024;

export class RewriteError extends Error {
  readonly code = 'ESTREAM';
}

/** The message as one attempt sends it, with the From rewritten; `size` is its new size in bytes. */
export async function rewriteFrom(
  raw: Buffer | { readonly path: string },
  size: number,
  from: string,
): Promise<{ raw: Buffer | { readonly stream: () => Readable }; size: number }> {
  if (Buffer.isBuffer(raw)) {
    const split = splitHeader(raw, true);
    if (!split) throw new RewriteError('the message has no header block to rewrite');
    const head = Buffer.from(rewriteHeaderBlock(split.head, from), 'latin1');
    return { raw: Buffer.concat([head, raw.subarray(split.bodyStart)]), size: head.length + raw.length - split.bodyStart };
  }
  const handle = await fs.open(raw.path, 'r');
  let prefix: Buffer;
  try {
    const length = Math.min(size, MAX_HEADER_BYTES);
    prefix = Buffer.alloc(length);
    const { bytesRead } = await handle.read(prefix, 0, length, 0);
    prefix = prefix.subarray(0, bytesRead);
  } finally {
    await handle.close();
  }
  const split = splitHeader(prefix, size <= MAX_HEADER_BYTES);
  if (!split) throw new RewriteError(`no end of the header block within the first ${MAX_HEADER_BYTES} bytes; From cannot be rewritten`);
  const head = Buffer.from(rewriteHeaderBlock(split.head, from), 'latin1');
  const path = raw.path;
  const start = split.bodyStart;
  async function* bytes(): AsyncGenerator<Buffer> {
    yield head;
    if (start < size) yield* createReadStream(path, { start });
  }
  // A stream is read once: each try of the attempt gets its own (see RawMessage).
  return { raw: { stream: () => Readable.from(bytes(), { objectMode: false }) }, size: head.length + size - start };
}

/**
 * The header block (latin1, every field with its line end) and where the rest (the blank line and the
 * body) starts. `whole`: the buffer is the whole message, so a message without a blank line is all header.
 */
function splitHeader(bytes: Buffer, whole: boolean): { head: string; bodyStart: number } | undefined {
  if (bytes[0] === 0x0a || (bytes[0] === 0x0d && bytes[1] === 0x0a)) return { head: '', bodyStart: 0 };
  const crlf = bytes.indexOf('\r\n\r\n');
  const lf = bytes.indexOf('\n\n');
  let end: number;
  if (crlf >= 0 && (lf < 0 || crlf < lf)) end = crlf + 2;
  else if (lf >= 0) end = lf + 1;
  else if (whole) end = bytes.length;
  else return undefined;
  return { head: bytes.subarray(0, end).toString('latin1'), bodyStart: end };
}

/** Rewrites From in a header block (latin1 text, fields with their line ends). Exported for tests. */
export function rewriteHeaderBlock(head: string, from: string): string {
  const eol = /\r\n/.test(head) || head === '' ? '\r\n' : '\n';
  const fields: string[] = [];
  for (const line of head.split(/(?<=\n)/)) {
    if (line === '') continue;
    if ((line[0] === ' ' || line[0] === '\t') && fields.length > 0) fields[fields.length - 1] += line;
    else fields.push(line);
  }
  if (fields.length > 0 && !fields[fields.length - 1].endsWith('\n')) fields[fields.length - 1] += eol;
  const nameOf = (field: string): string => field.slice(0, Math.max(0, field.indexOf(':'))).trim().toLowerCase();
  const at = fields.findIndex((field) => nameOf(field) === 'from');
  if (at < 0) return [...fields, `From: <${from}>${eol}`].join('');
  const original = fields[at];
  const value = original.slice(original.indexOf(':') + 1);
  const unfolded = value.replace(/\r?\n(?=[ \t])/g, '').trim();
  const first = addressparser(unfolded, { flatten: true }).find((a) => 'address' in a && a.address);
  const name = first?.name ?? '';
  const rewritten = [`From: ${name ? `${displayName(name)} ` : ''}<${from}>${eol}`];
  // The original sender still gets the replies, unless the message says where replies go.
  if (!fields.some((field) => nameOf(field) === 'reply-to')) rewritten.push(`Reply-To:${value}`);
  fields.splice(at, 1, ...rewritten);
  return fields.join('');
}

/** A display name as a phrase: encoded words and plain atoms as they are, anything else quoted. */
function displayName(name: string): string {
  if (/^=\?[^?]+\?[bBqQ]\?[^?]*\?=(\s+=\?[^?]+\?[bBqQ]\?[^?]*\?=)*$/.test(name)) return name;
  if (/^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~ ]+$/.test(name)) return name;
  return `"${name.replace(/["\\]/g, '\\$&')}"`;
}
