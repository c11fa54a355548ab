// The From rewrite of a downstream with `from:`: only the header block changes (From with the display
// name kept, Reply-To with the original From unless one exists), the envelope sender follows, and every
// body byte arrives as sent, for a body in memory and for one spilled to disk.
import { rewriteHeaderBlock } from '../src/downstreams/from-rewrite';
import { startDownstream, type Downstream } from './support/downstream';
import { testConfig } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { sendWithNodemailer } from './support/clients';

let verified: Downstream;
let plain: Downstream;
let p: RunningProxy;
beforeAll(async () => {
  verified = await startDownstream();
  plain = await startDownstream();
  const text = testConfig({
    users: [
      { selector: 'round-robin.js', downstreams: [{ name: 'ses', addr: verified.addr, from: 'noreply@verified.example' }] },
      { email: 'plain@user.com', selector: 'round-robin.js', downstreams: [{ name: 'relay', addr: plain.addr }] },
    ],
  });
  p = await startProxy({ 'config.yaml': text });
});
afterAll(async () => {
  await p.stop();
  await verified.close();
  await plain.close();
});

/** The bytes after the header block: the blank line and the body. */
function rest(raw: Buffer): Buffer {
  return raw.subarray(raw.indexOf('\r\n\r\n') + 2);
}

function headerOf(raw: Buffer): string {
  return raw.subarray(0, raw.indexOf('\r\n\r\n') + 2).toString('latin1');
}

// A folded, encoded From; a body line that looks like a From header; 8-bit bytes; a leading dot.
const HEAD = 'From: =?UTF-8?Q?Al=C3=AFce_Example?=\r\n <alice@example.com>\r\nTo: bob@example.org\r\nSubject: rewrite me\r\nMessage-ID: <r1@example.com>\r\n';
const BODY = Buffer.concat([
  Buffer.from('\r\nFrom: this line is body, not a header\r\n.leading dot\r\n'),
  Buffer.from([0xc3, 0xa9, 0xff, 0x0d, 0x0a]),
  Buffer.from('Reply-To: also body\r\nlast line\r\n'),
]);

test('From is rewritten with its display name, Reply-To carries the original, MAIL FROM follows, and the body is byte-exact', async () => {
  const raw = Buffer.concat([Buffer.from(HEAD, 'latin1'), BODY]);
  expect(await sendWithNodemailer(p.port, { raw, from: 'alice@example.com', to: 'bob@example.org' })).toMatchObject({ ok: true });
  const got = verified.received.at(-1)!;
  expect(got.from).toBe('noreply@verified.example');
  const header = headerOf(got.raw);
  expect(header).toContain('From: =?UTF-8?Q?Al=C3=AFce_Example?= <noreply@verified.example>\r\n');
  expect(header).toContain('Reply-To: =?UTF-8?Q?Al=C3=AFce_Example?=\r\n <alice@example.com>\r\n');
  expect(header.match(/^From:/gim)).toHaveLength(1);
  expect(header).toContain('Subject: rewrite me\r\nMessage-ID: <r1@example.com>\r\n');
  expect(rest(got.raw).equals(BODY)).toBe(true);
});

test('an existing Reply-To is kept, and a spilled (over 1 MiB) body is rewritten byte-exact too', async () => {
  const big = Buffer.alloc(1_500_000, 'x');
  for (let i = 0; i < big.length; i += 100) big.write('\r\n', i);
  const body = Buffer.concat([Buffer.from('\r\nFrom: body\r\n'), big, Buffer.from('\r\nend\r\n')]);
  const head = '"Bob, the sender" <bob@example.com>';
  const raw = Buffer.concat([Buffer.from(`Reply-To: replies@example.com\r\nFrom: ${head}\r\nSubject: big\r\n`), body]);
  expect(await sendWithNodemailer(p.port, { raw, from: 'bob@example.com', to: 'x@example.org' })).toMatchObject({ ok: true });
  const got = verified.received.at(-1)!;
  const header = headerOf(got.raw);
  expect(header).toBe('Reply-To: replies@example.com\r\nFrom: "Bob, the sender" <noreply@verified.example>\r\nSubject: big\r\n');
  expect(rest(got.raw).equals(body)).toBe(true);
});

test('a downstream without from: gets the message unchanged', async () => {
  const raw = Buffer.concat([Buffer.from(HEAD, 'latin1'), BODY]);
  expect(await sendWithNodemailer(p.port, { raw, from: 'alice@example.com', to: 'bob@example.org' }, { user: 'plain@user.com', pass: 'password123' })).toMatchObject({ ok: true });
  expect(plain.received.at(-1)!.raw.equals(raw)).toBe(true);
  expect(plain.received.at(-1)!.from).toBe('alice@example.com');
});

test('header blocks with bare LF, a bare address, a comment name or no From at all', () => {
  expect(rewriteHeaderBlock('From: a@example.com\nSubject: x\n', 'v@ok.example')).toBe('From: <v@ok.example>\nReply-To: a@example.com\nSubject: x\n');
  expect(rewriteHeaderBlock('from: a@example.com (Alice A.)\r\n', 'v@ok.example')).toBe('From: "Alice A." <v@ok.example>\r\nReply-To: a@example.com (Alice A.)\r\n');
  expect(rewriteHeaderBlock('Subject: none\r\n', 'v@ok.example')).toBe('Subject: none\r\nFrom: <v@ok.example>\r\n');
});
