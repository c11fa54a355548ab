// Builds what a selector is told about a message from the envelope and the header block.
import libmime from 'libmime';
import type { MessageSummary } from '../selector/types';

/**
 * The first Subject header, decoded (at most 1000 characters), exactly as libmime.decodeHeaders would
 * give it, without parsing the other headers: the block is split and unfolded by libmime's rules (lines
 * end in CRLF, LF or CR; leading empty lines skipped; the first empty line ends the block; a line that
 * starts with a space or tab continues the previous one), and only a header whose name may start with
 * "s" goes through libmime's own decodeHeader. Received and DKIM lines are most of a real header block.
 */
export function subjectOf(headerBlock: string): string {
  try {
    const lines = headerBlock.split(/\r?\n|\r/);
    let i = 0;
    while (i < lines.length && lines[i] === '') i++;
    while (i < lines.length && lines[i] !== '') {
      let line = lines[i++];
      while (i < lines.length && isContinuation(lines[i])) line += '\r\n' + lines[i++];
      if (!MAY_BE_SUBJECT.test(line)) continue;
      const header = libmime.decodeHeader(line);
      if (header.key === 'subject') return libmime.decodeWords(header.value).slice(0, 1000);
    }
    return '';
  } catch {
    return '';
  }
}

/** A line decodeHeader could read as a header named "s...": whitespace (which it trims), then s. */
const MAY_BE_SUBJECT = /^\s*s/i;

function isContinuation(line: string): boolean {
  const first = line.charCodeAt(0);
  return first === 32 || first === 9;
}

/** The summary of a message; `attempt` and `queuedAt` default to a live one (1, null), a spool retry sets them. */
export function summarize(
  fields: Omit<MessageSummary, 'subject' | 'attempt' | 'queuedAt'> & Partial<Pick<MessageSummary, 'attempt' | 'queuedAt'>>,
  headerBlock: string,
): MessageSummary {
  return { attempt: 1, queuedAt: null, ...fields, to: [...fields.to], subject: subjectOf(headerBlock) };
}
