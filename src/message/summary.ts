// Builds what a selector is told about a message from the envelope and the header block.
import libmime from 'libmime';
import type { MessageSummary } from '../selector/types';

export function subjectOf(headerBlock: string): string {
  try {
    const headers = libmime.decodeHeaders(headerBlock) as Record<string, string[] | undefined>;
    const raw = headers.subject?.[0];
    return raw === undefined ? '' : libmime.decodeWords(raw).slice(0, 1000);
  } catch {
    return '';
  }
}

/** The summary of a message; `attempt` and `queuedAt` default to a live one (1, null), a spool retry sets them. */
export function summarize(
  fields: Omit<MessageSummary, 'subject' | 'attempt' | 'queuedAt'> & Partial<Pick<MessageSummary, 'attempt' | 'queuedAt'>>,
  headerBlock: string,
): MessageSummary {
  return { attempt: 1, queuedAt: null, ...fields, to: [...fields.to], subject: subjectOf(headerBlock) };
}
