// What a selector sees as message.subject: the first Subject header, decoded, exactly as libmime's full
// header parser gives it (subjectOf only skips parsing the other headers).
import libmime from 'libmime';
import { subjectOf } from '../src/message/summary';

/** The reference: every header parsed by libmime, then the first Subject decoded. */
function reference(block: string): string {
  try {
    const headers = libmime.decodeHeaders(block) as Record<string, string[] | undefined>;
    const raw = headers.subject?.[0];
    return raw === undefined ? '' : libmime.decodeWords(raw).slice(0, 1000);
  } catch {
    return '';
  }
}

const REAL = [
  'Received: from mail.example.com (mail.example.com [192.0.2.1])\r\n\tby mx.example.net with ESMTPS id abc123\r\n\tfor <x@example.net>; Thu, 26 Nov 2026 12:00:00 +0000',
  'DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=sel;\r\n h=from:to:subject:date; bh=abc=;\r\n b=' + 'A'.repeat(300),
  'From: "Sender" <sender@example.com>',
  'Sender: s@example.com',
  'Subject: =?UTF-8?B?SGVsbG8gd29ybGQ=?= and\r\n more',
  'X-Spam: no',
].join('\r\n');

describe('message.subject', () => {
  test.each([
    ['a real header block with a folded, encoded subject', `${REAL}\r\n\r\nbody`, 'Hello world and more'],
    ['no subject', 'From: a\r\nTo: b\r\n\r\n', ''],
    ['the first of two', 'Subject: one\r\nSubject: two\r\n', 'one'],
    ['a subject after the empty line is body', 'From: a\r\n\r\nSubject: body\r\n', ''],
    ['a continuation line is not a header', 'X: 1\r\n Subject: continuation\r\nSubject: real', 'real'],
    ['bare LF and bare CR line ends', 'Subj: no\rSubject: cr only\r', 'cr only'],
    ['a name folded away from its colon', 'Subject\r\n : folded name\r\n', 'folded name'],
    ['space before the colon, any case', 'SUBJECT :\tcaps\n', 'caps'],
    ['leading non-ASCII whitespace', '\u00a0Subject: nbsp', 'nbsp'],
    ['quoted-printable in Latin-1', 'Subject: =?iso-8859-1?Q?caf=E9?=\r\n', 'café'],
    ['cut at 1000 characters', `Subject: ${'x'.repeat(2000)}`, 'x'.repeat(1000)],
  ])('%s', (_name, block, expected) => {
    expect(subjectOf(block)).toBe(expected);
    expect(subjectOf(block)).toBe(reference(block));
  });

  test('agrees with libmime on 20000 random header blocks', () => {
    const parts = ['Subject', 'subject', 'SUBJECT', 'Sender', 'S', 'X', ':', ' ', '\t', '\u00a0', '\f', '\r\n', '\n', '\r', 'a', '=?UTF-8?Q?x?=', '=?UTF-8?B?w6k=?=', ''];
    let seed = 12345;
    const random = (n: number): number => {
      seed = (seed * 1103515245 + 12345) % 2147483648;
      return seed % n;
    };
    for (let n = 0; n < 20000; n++) {
      let block = '';
      for (let k = random(14); k > 0; k--) block += parts[random(parts.length)];
      expect([block, subjectOf(block)]).toEqual([block, reference(block)]);
    }
  });
});
