// Byte-for-byte relay: what a downstream receives is exactly what the client sent (after SMTP's own
// dot-stuffing is undone on both hops), whatever client sent it, and large bodies that spill to a temp
// file leave nothing behind.
import { randomBytes } from 'node:crypto';
import fs, { readdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { startDownstream, type Downstream } from './support/downstream';
import { testConfig } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { sendWithNodemailer, sendWithPython, swaks } from './support/clients';
import { connectRaw, dotStuff, plainAuth } from './support/raw';

const CRLF = '\r\n';

/** A message that exercises every way a relay could alter bytes. Ends with CRLF, as a message on the wire does. */
function trickyMessage(tag: string): Buffer {
  return Buffer.from(
    [
      'From: Zoë Ünïcødé <app@example.com>',
      'To: rcpt@example.org',
      `Subject: Grüße aus Köln – naïve café ☕ ${tag}`,
      'Message-ID: <' + tag + '@example.com>',
      'MIME-Version: 1.0',
      'Content-Type: text/plain; charset=utf-8',
      'Content-Transfer-Encoding: 8bit',
      '',
      '.this line starts with a dot and must not lose it',
      '..and this one with two',
      '.',
      'a line with trailing spaces and a tab   \t',
      'UTF-8 in the body: 日本語のテキスト, ελληνικά, emoji 📨',
      '',
      '',
      'From the start of a line (mbox would quote this; SMTP must not)',
      `end of ${tag}`,
      '',
    ].join(CRLF),
    'utf8',
  );
}

/** A multipart message with a `bytes`-long random attachment, base64 in 76-column CRLF lines. */
function withAttachment(bytes: number): Buffer {
  const boundary = 'b0undary-' + randomBytes(8).toString('hex');
  const encoded = randomBytes(bytes).toString('base64').replace(/.{76}/g, `$&${CRLF}`);
  return Buffer.from(
    [
      'From: app@example.com',
      'To: rcpt@example.org',
      'Subject: big attachment',
      'MIME-Version: 1.0',
      `Content-Type: multipart/mixed; boundary="${boundary}"`,
      '',
      `--${boundary}`,
      'Content-Type: text/plain; charset=utf-8',
      '',
      '.a dot-stuffed line in a big message',
      `--${boundary}`,
      'Content-Type: application/octet-stream',
      'Content-Transfer-Encoding: base64',
      'Content-Disposition: attachment; filename="blob.bin"',
      '',
      encoded.endsWith(CRLF) ? encoded.slice(0, -2) : encoded,
      `--${boundary}--`,
      '',
    ].join(CRLF),
    'utf8',
  );
}

function spillDirs(dir: string): string[] {
  return readdirSync(dir).filter((name) => name.startsWith('smtpmux-'));
}

describe('byte-for-byte passthrough', () => {
  let ds: Downstream;
  let proxy: RunningProxy;

  beforeAll(async () => {
    ds = await startDownstream({ user: 'relay-user', pass: 'relay-pass' });
    proxy = await startProxy({
      'config.yaml': testConfig({
        selector: 'round-robin.js',
        limits: { selector_timeout_ms: 1000, selector_memory_mb: 32 },
        downstreams: [{ name: 'relay', addr: ds.addr, user: 'relay-user', pass: 'relay-pass' }],
      }),
    });
  });
  afterAll(async () => {
    await proxy?.stop();
    await ds?.close();
  });
  beforeEach(() => ds.received.splice(0));

  test('nodemailer raw: dot-stuffed lines, 8-bit UTF-8 body and subject and CRLF reach the downstream unchanged', async () => {
    const raw = trickyMessage('nodemailer');
    const sent = await sendWithNodemailer(proxy.port, { raw, from: 'app@example.com', to: 'rcpt@example.org' });
    expect(sent).toMatchObject({ ok: true });
    expect(ds.received).toHaveLength(1);
    const got = ds.received[0];
    expect(got.raw.toString('hex')).toBe(raw.toString('hex'));
    expect(got.from).toBe('app@example.com');
    expect(got.to).toEqual(['rcpt@example.org']);
    expect(got.user).toBe('relay-user');
  });

  test('an SMTPUTF8 recipient and sender are relayed with SMTPUTF8 and the message unchanged', async () => {
    const raw = trickyMessage('smtputf8');
    const to = 'пользователь@пример.рф';
    const from = 'zoë@exämple.com';
    const sent = await sendWithNodemailer(proxy.port, { raw, from, to });
    expect(sent).toMatchObject({ ok: true });
    expect(ds.received).toHaveLength(1);
    const got = ds.received[0];
    expect(got.to).toEqual([to]);
    expect(got.from).toBe(from);
    expect(got.smtpUtf8).toBe(true);
    expect(got.raw.equals(raw)).toBe(true);
    expect(got.user).toBe('relay-user');
  });

  test('swaks --data from a file: the downstream receives the file byte for byte', async () => {
    const raw = trickyMessage('swaks');
    const file = path.join(proxy.dir, 'swaks-message.eml');
    // swaks always writes CRLF after the --data content before the closing dot (checked against a plain
    // smtp-server): the file leaves off its final CRLF so that what swaks puts on the wire is `raw`.
    writeFileSync(file, raw.subarray(0, raw.length - 2));
    const result = await swaks(proxy.port, ['--data', `@${file}`, '--from', 'swaks@example.com', '--to', 'rcpt@example.org']);
    expect(result.code).toBe(0);
    expect(ds.received).toHaveLength(1);
    const got = ds.received[0];
    expect(got.raw.toString('utf8')).toBe(raw.toString('utf8'));
    expect(got.raw.equals(raw)).toBe(true);
    expect(got.from).toBe('swaks@example.com');
    expect(got.user).toBe('relay-user');
  });

  test('python smtplib: the downstream receives the message byte for byte', async () => {
    const raw = trickyMessage('python');
    const sent = await sendWithPython(proxy.port, raw.toString('utf8'));
    expect(sent).toMatchObject({ ok: true });
    expect(ds.received).toHaveLength(1);
    const got = ds.received[0];
    expect(got.raw.equals(raw)).toBe(true);
    expect(got.from).toBe('py@example.com');
    expect(got.to).toEqual(['rcpt@example.org']);
    expect(got.user).toBe('relay-user');
  });

  test('BODY=8BITMIME from the client is relayed to the downstream with the bytes unchanged', async () => {
    const raw = trickyMessage('8bitmime');
    const smtp = await connectRaw(proxy.port);
    try {
      expect((await smtp.command('EHLO client.example')).text).toMatch(/8BITMIME[\s\S]*SMTPUTF8|SMTPUTF8[\s\S]*8BITMIME/);
      expect((await smtp.command(`AUTH PLAIN ${plainAuth('test@user.com', 'password123')}`)).code).toBe(235);
      expect((await smtp.command('MAIL FROM:<app@example.com> BODY=8BITMIME')).code).toBe(250);
      expect((await smtp.command('RCPT TO:<rcpt@example.org>')).code).toBe(250);
      expect((await smtp.command('DATA')).code).toBe(354);
      const reply = await smtp.sendData(Buffer.concat([dotStuff(raw), Buffer.from('.\r\n')]));
      expect(reply.code).toBe(250);
    } finally {
      smtp.close();
    }
    expect(ds.received).toHaveLength(1);
    expect(ds.received[0].bodyType).toBe('8bitmime');
    expect(ds.received[0].raw.equals(raw)).toBe(true);
  });

  test('8-bit and binary-ish bytes (NUL, control characters, every byte value but CR and LF) in CRLF lines arrive byte for byte', async () => {
    const values = Buffer.from(Array.from({ length: 256 }, (_, i) => i).filter((b) => b !== 10 && b !== 13));
    const lines = Array.from({ length: 400 }, (_, i) => Buffer.concat([values.subarray(i % 200, (i % 200) + 60), Buffer.from(CRLF)]));
    const raw = Buffer.concat([Buffer.from(`From: app@example.com${CRLF}Subject: bytes${CRLF}${CRLF}`), ...lines, Buffer.from(`.dot${CRLF}..two${CRLF}`)]);
    const smtp = await connectRaw(proxy.port);
    try {
      expect((await smtp.command('EHLO client.example')).code).toBe(250);
      expect((await smtp.command(`AUTH PLAIN ${plainAuth('test@user.com', 'password123')}`)).code).toBe(235);
      expect((await smtp.sendMessage({ body: raw })).code).toBe(250);
    } finally {
      smtp.close();
    }
    expect(ds.received).toHaveLength(1);
    expect(ds.received[0].raw.equals(raw)).toBe(true);
  });

  test('bare LF line ends are relayed as CRLF (nodemailer repairs them on the way out), every other byte unchanged', async () => {
    // A lone LF is not a line end in SMTP; passing it on would let a lenient downstream see a different
    // end of data than we did (SMTP smuggling), so the downstream gets CRLF, and a dot after a bare LF
    // comes out stuffed and back, unchanged.
    const body = `From: app@example.com\nSubject: bare LF\n\nline one\n.dot after a bare LF\nlast line\r\n`;
    const smtp = await connectRaw(proxy.port);
    try {
      expect((await smtp.command('EHLO client.example')).code).toBe(250);
      expect((await smtp.command(`AUTH PLAIN ${plainAuth('test@user.com', 'password123')}`)).code).toBe(235);
      expect((await smtp.command('MAIL FROM:<app@example.com>')).code).toBe(250);
      expect((await smtp.command('RCPT TO:<rcpt@example.org>')).code).toBe(250);
      expect((await smtp.command('DATA')).code).toBe(354);
      // As a lenient client sends it: the dot after the bare LF stuffed, the end CRLF.CRLF.
      expect((await smtp.sendData(body.replace('\n.dot', '\n..dot') + '.\r\n')).code).toBe(250);
    } finally {
      smtp.close();
    }
    expect(ds.received).toHaveLength(1);
    expect(ds.received[0].raw.toString('latin1')).toBe(body.replace(/\r?\n/g, CRLF));
  });

  test('a 3 MB body full of dot-stuffed lines, cut anywhere by TCP, arrives byte for byte (held in memory, no temp file)', async () => {
    const line = (i: number): string => (i % 3 === 0 ? '.' : '') + (i % 5 === 0 ? '..' : '') + `line ${i} of a body whose lines often start with dots${CRLF}`;
    const raw = Buffer.from(`From: app@example.com${CRLF}Subject: dots${CRLF}${CRLF}` + Array.from({ length: 60_000 }, (_, i) => line(i)).join(''));
    expect(raw.length).toBeGreaterThan(3 * 1024 * 1024);
    const sent = await sendWithNodemailer(proxy.port, { raw, from: 'app@example.com', to: 'rcpt@example.org' });
    expect(sent).toMatchObject({ ok: true });
    expect(ds.received).toHaveLength(1);
    expect(ds.received[0].raw.equals(raw)).toBe(true);
    const logged = proxy.logs.filter((l) => l.outcome === 'delivered').pop()!;
    expect(logged).toMatchObject({ size: raw.length });
    expect(logged.spilled).toBeUndefined();
  });

  test('a 10 MB attachment spills to a temp file, arrives byte for byte, and the temp file is gone afterwards', async () => {
    const raw = withAttachment(10 * 1024 * 1024);
    expect(raw.length).toBeGreaterThan(10 * 1024 * 1024);
    // One spill folder per spilled message.
    let spills = 0;
    const mkdtemp = fs.promises.mkdtemp;
    const spy = jest.spyOn(fs.promises, 'mkdtemp').mockImplementation(((prefix: string, ...rest: unknown[]) => {
      if (path.basename(prefix).startsWith('smtpmux-')) spills++;
      return (mkdtemp as (...a: unknown[]) => Promise<string>)(prefix, ...rest);
    }) as typeof mkdtemp);
    const sent = await sendWithNodemailer(proxy.port, { raw, from: 'app@example.com', to: 'rcpt@example.org' }).finally(() => spy.mockRestore());
    expect(spills).toBe(1);
    expect(sent).toMatchObject({ ok: true });
    expect(ds.received).toHaveLength(1);
    const got = ds.received[0];
    expect(got.raw.length).toBe(raw.length);
    expect(got.raw.equals(raw)).toBe(true);
    expect(got.user).toBe('relay-user');
    const line = proxy.logs.filter((l) => l.outcome === 'delivered').pop()!;
    expect(line).toMatchObject({ spilled: true, size: raw.length });
    // The reply is sent after the body is disposed: nothing may be left under the spill folder.
    expect(spillDirs(proxy.dir)).toEqual([]);
  });

  test('a spilled body that no downstream accepts is removed too', async () => {
    ds.fail({ kind: 'reply', code: 451, message: '4.3.0 Try again later' });
    try {
      // Past a quarter of the in-memory budget (BodyMemory), so it spills.
      const raw = withAttachment(9 * 1024 * 1024);
      const sent = await sendWithNodemailer(proxy.port, { raw, from: 'app@example.com', to: 'rcpt@example.org' });
      expect(sent).toMatchObject({ ok: false, code: 451 });
      expect(proxy.logs.filter((l) => l.outcome === 'deferred').pop()).toMatchObject({ spilled: true });
      expect(spillDirs(proxy.dir)).toEqual([]);
    } finally {
      ds.fail({ kind: 'none' });
    }
  });
});
