// Our replies keep the catalogue's enhanced status code (451 4.4.1, not smtp-server's 4.3.0 guess), on
// our server's connections only: a plain smtp-server in the same process still adds its own codes. If an
// smtp-server upgrade changes how replies are written, this is the test that says so.
import { SMTPServer, type SMTPServerOptions } from 'smtp-server';
import { SmtpMuxError } from '../src/errors';
import { CatalogueSMTPServer } from '../src/smtp/replies';
import { deadPort, listenOnLoopback, type Listening } from './support/downstream';
import { connectRaw } from './support/raw';
import { testConfig } from './support/config';
import { startProxy } from './support/proxy';
import { sendWithNodemailer } from './support/clients';

const open: { close(): Promise<void> }[] = [];
afterAll(async () => {
  for (const item of open.splice(0).reverse()) await item.close();
});

/** A server that refuses every recipient with the catalogue's "downstreams unavailable" error. */
function options(): SMTPServerOptions {
  return {
    authOptional: true,
    // Off by default in smtp-server 3; our server turns them on.
    hideENHANCEDSTATUSCODES: false,
    disabledCommands: ['STARTTLS'],
    logger: false,
    onRcptTo(_address, _session, callback) {
      callback(new SmtpMuxError('SMTPMUX_DOWNSTREAMS_UNAVAILABLE'));
    },
  };
}

async function started(server: SMTPServer): Promise<Listening> {
  const listening = await listenOnLoopback(server);
  open.push(listening);
  return listening;
}

async function replies(port: number): Promise<{ mail: string; rcpt: string }> {
  const smtp = await connectRaw(port);
  try {
    await smtp.command('EHLO test.example');
    const mail = await smtp.command('MAIL FROM:<a@example.com>');
    const rcpt = await smtp.command('RCPT TO:<b@example.org>');
    return { mail: mail.text, rcpt: rcpt.text };
  } finally {
    smtp.close();
  }
}

test('a catalogue error keeps its own enhanced code on our server, while a plain smtp-server in the same process adds its own', async () => {
  const catalogue = new SmtpMuxError('SMTPMUX_DOWNSTREAMS_UNAVAILABLE');
  expect(catalogue.message).toMatch(/^4\.4\.1 /);
  // The plain one is started first and last, so neither order of creation nor of use hides a leak.
  const plain1 = await started(new SMTPServer(options()));
  const ours = await started(new CatalogueSMTPServer(options()));
  const plain2 = await started(new SMTPServer(options()));

  const mine = await replies(ours.port);
  expect(mine.rcpt).toBe(`451 ${catalogue.message}`);
  // smtp-server's own replies on our server still carry its codes.
  expect(mine.mail).toMatch(/^250 2\.1\.0 /);

  for (const plain of [plain1, plain2]) {
    const theirs = await replies(plain.port);
    expect(theirs.rcpt).toMatch(/^451 4\.\d+\.\d+ 4\.4\.1 /);
    expect(theirs.mail).toMatch(/^250 2\.1\.0 /);
  }
});

test('through the proxy, every downstream down reads 451 4.4.1 with one enhanced code', async () => {
  const proxy = await startProxy({ 'config.yaml': testConfig({ selector: 'round-robin.js', downstreams: [{ name: 'down', addr: `127.0.0.1:${await deadPort()}` }] }) });
  open.push({ close: () => proxy.stop() });
  const sent = await sendWithNodemailer(proxy.port, { subject: 'nowhere to go' });
  expect(sent.code).toBe(451);
  expect(sent.response).toMatch(/^451 4\.4\.1 (?![245]\.\d)/);
});
