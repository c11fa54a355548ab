// A delivery status notification (RFC 3464): the bounce sent to a dead message's envelope sender when
// the user's queue has `bounce: true`. A multipart/report with a sentence for a human, the
// machine-readable message/delivery-status, and the original's header block (never its body).
import { randomBytes } from 'node:crypto';
import { roughDuration } from '../rough-duration';
import type { SpoolEntry } from './store';

export interface Bounce {
  /** Our name (`hostname`, else the machine's), as Reporting-MTA and in From. */
  readonly reportingMta: string;
  readonly original: SpoolEntry;
  /** RFC 3463 status: the downstream's 5.x.x, or 4.4.7 when max_age ran out. */
  readonly status: string;
  /** What the last attempt ended with, for Diagnostic-Code. */
  readonly diagnostic: string;
  readonly now: number;
}

/** One line of a header field: no CR or LF from outside can start a header of its own. */
const oneLine = (text: string): string => text.replace(/[\r\n]+/g, ' ').slice(0, 900);

const span = (ms: number): string => roughDuration(ms, { seconds: ' second(s)', minutes: ' minutes', hours: ' hours', days: ' days' });

export function buildBounce(bounce: Bounce): Buffer {
  const { original, reportingMta, status } = bounce;
  const boundary = `=_smtpmux_${randomBytes(12).toString('hex')}`;
  const expired = status === '4.4.7';
  const date = new Date(bounce.now).toUTCString().replace('GMT', '+0000');
  const subjectLine = /^Subject:[ \t]*(.*(?:\r?\n[ \t].*)*)/im.exec(original.headers)?.[1]?.replace(/\r?\n[ \t]+/g, ' ') ?? '';
  const why = expired
    ? `It could not be delivered within the time allowed: every attempt for ${span(bounce.now - original.queuedAt)} failed.`
    : 'The receiving server refused it permanently.';
  const human = [
    `This is the mail system at ${reportingMta}.`,
    '',
    `Your message${subjectLine ? ` "${oneLine(subjectLine).slice(0, 200)}"` : ''} to ${original.envelope.to.join(', ')} was not delivered.`,
    why,
    '',
    `The last error was: ${oneLine(bounce.diagnostic)}`,
    `Message id: ${original.id}`,
  ].join('\r\n');
  const perMessage = [`Reporting-MTA: dns; ${oneLine(reportingMta)}`, `X-SMTPMux-Queue-ID: ${original.id}`, `Arrival-Date: ${new Date(original.queuedAt).toUTCString().replace('GMT', '+0000')}`];
  const perRecipient = original.envelope.to.map((rcpt) =>
    [`Final-Recipient: rfc822; ${oneLine(rcpt)}`, 'Action: failed', `Status: ${status}`, `Diagnostic-Code: smtp; ${oneLine(bounce.diagnostic)}`, `Last-Attempt-Date: ${date}`].join('\r\n'),
  );
  const text = [
    `From: Mail Delivery System <MAILER-DAEMON@${oneLine(reportingMta)}>`,
    `To: <${oneLine(original.envelope.from)}>`,
    'Subject: Undelivered Mail Returned to Sender',
    `Date: ${date}`,
    `Message-ID: <${original.id}.${randomBytes(6).toString('hex')}@${oneLine(reportingMta)}>`,
    'Auto-Submitted: auto-replied',
    'MIME-Version: 1.0',
    `Content-Type: multipart/report; report-type=delivery-status; boundary="${boundary}"`,
    '',
    'This is a MIME-encapsulated message.',
    '',
    `--${boundary}`,
    'Content-Type: text/plain; charset=utf-8',
    'Content-Transfer-Encoding: 8bit',
    '',
    human,
    '',
    `--${boundary}`,
    'Content-Type: message/delivery-status',
    '',
    [perMessage.join('\r\n'), ...perRecipient].join('\r\n\r\n'),
    '',
    `--${boundary}`,
    'Content-Type: text/rfc822-headers',
    '',
    original.headers.replace(/\r?\n/g, '\r\n').trimEnd(),
    '',
    `--${boundary}--`,
    '',
  ].join('\r\n');
  return Buffer.from(text, 'utf8');
}
