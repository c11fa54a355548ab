// A bare SMTP client over one TCP socket, for tests that need the exact reply to one command (530
// before AUTH, 538 on plaintext, 552 after an oversized DATA) and then keep using the same connection.
import net from 'node:net';

export interface Reply {
  readonly code: number;
  /** Every line of the reply, joined with "\n", without CRLF. */
  readonly text: string;
}

export interface RawSmtp {
  /** The server's greeting. */
  readonly greeting: Reply;
  /** Sends one command line (CRLF added) and waits for its reply. */
  command(line: string): Promise<Reply>;
  /** Sends raw bytes (already dot-stuffed, ending with CRLF.CRLF) and waits for the reply. */
  sendData(bytes: Buffer | string): Promise<Reply>;
  /** EHLO, AUTH PLAIN, MAIL, RCPT, DATA, the body (dot-stuffed here), QUIT not included. */
  sendMessage(options: { from?: string; to?: string; body: Buffer | string }): Promise<Reply>;
  /** Writes bytes without waiting for any reply (half a DATA, say). */
  write(bytes: Buffer | string): void;
  close(): void;
}

/**
 * `localAddress` picks the client's source address (127.0.0.2 is another client on loopback); `socket`
 * continues on a connected socket instead (one that has sent a PROXY header, say).
 */
export async function connectRaw(port: number, timeoutMs = 15_000, options: { localAddress?: string; socket?: net.Socket } = {}): Promise<RawSmtp> {
  const socket = options.socket ?? net.connect({ host: '127.0.0.1', port, localAddress: options.localAddress });
  socket.setNoDelay(true);
  let buffered = '';
  let waiting: { resolve: (r: Reply) => void; reject: (e: Error) => void } | undefined;
  const lines: string[] = [];
  let failure: Error | undefined;

  const pump = (): void => {
    let at: number;
    while ((at = buffered.indexOf('\r\n')) >= 0) {
      const line = buffered.slice(0, at);
      buffered = buffered.slice(at + 2);
      lines.push(line);
      // "250-..." continues, "250 ..." ends a reply.
      if (/^\d{3}(?: |$)/.test(line) && waiting) {
        const text = lines.splice(0).join('\n');
        const done = waiting;
        waiting = undefined;
        done.resolve({ code: Number(line.slice(0, 3)), text });
      }
    }
  };
  socket.on('data', (chunk: Buffer) => {
    buffered += chunk.toString('latin1');
    pump();
  });
  const fail = (err: Error): void => {
    failure = err;
    waiting?.reject(err);
    waiting = undefined;
  };
  socket.on('error', fail);
  socket.on('close', () => fail(new Error('connection closed')));

  const next = (): Promise<Reply> =>
    new Promise<Reply>((resolve, reject) => {
      if (failure) return reject(failure);
      const timer = setTimeout(() => reject(new Error(`no reply within ${timeoutMs} ms`)), timeoutMs);
      waiting = {
        resolve: (r) => {
          clearTimeout(timer);
          resolve(r);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      pump();
    });

  if (socket.connecting) {
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', () => resolve());
      socket.once('error', reject);
    });
  }
  const greeting = await next();

  const command = (line: string): Promise<Reply> => {
    const reply = next();
    socket.write(`${line}\r\n`);
    return reply;
  };
  const sendData = (bytes: Buffer | string): Promise<Reply> => {
    const reply = next();
    socket.write(bytes);
    return reply;
  };

  return {
    greeting,
    command,
    sendData,
    async sendMessage({ from = 'raw@example.com', to = 'rcpt@example.org', body }) {
      const mail = await command(`MAIL FROM:<${from}>`);
      if (mail.code !== 250) return mail;
      const rcpt = await command(`RCPT TO:<${to}>`);
      if (rcpt.code !== 250) return rcpt;
      const data = await command('DATA');
      if (data.code !== 354) return data;
      return sendData(Buffer.concat([dotStuff(Buffer.from(body)), Buffer.from('.\r\n')]));
    },
    write: (bytes) => void socket.write(bytes),
    close: () => socket.destroy(),
  };
}

/** AUTH PLAIN's initial response for these credentials. */
export function plainAuth(user: string, pass: string): string {
  return Buffer.from(`\0${user}\0${pass}`, 'utf8').toString('base64');
}

/** Doubles a leading dot on every line, as SMTP's DATA requires; the body must end with CRLF. */
export function dotStuff(body: Buffer): Buffer {
  const text = body.toString('latin1');
  return Buffer.from((text.startsWith('.') ? '.' : '') + text.replace(/\r\n\./g, '\r\n..'), 'latin1');
}
