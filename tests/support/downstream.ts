// A real downstream SMTP server for tests: listens on 127.0.0.1 on a port the OS picks, optionally
// requires AUTH, records every message byte for byte, and can be told to fail in the ways real
// servers do (4xx, 5xx, drop the connection, stall).
import type { AddressInfo } from 'node:net';
import { SMTPServer } from 'smtp-server';

export interface Received {
  readonly from: string;
  readonly to: string[];
  readonly raw: Buffer;
  readonly user?: string;
  /** MAIL FROM carried SMTPUTF8. */
  readonly smtpUtf8?: boolean;
  /** MAIL FROM's BODY= parameter ("7bit" or "8bitmime"). */
  readonly bodyType?: string;
}

export type FailMode =
  | { kind: 'none' }
  | { kind: 'reply'; code: number; message: string }
  | { kind: 'drop' }
  | { kind: 'stall'; ms: number };

export interface Downstream {
  readonly port: number;
  readonly addr: string;
  readonly received: Received[];
  /** Connections opened to this server so far. */
  readonly connections: () => number;
  /** AUTH attempts that failed. */
  readonly authFailures: () => number;
  fail(mode: FailMode): void;
  close(): Promise<void>;
}

/** The Subject header of a received message, undecoded ("" when there is none). */
export function subjectOf(raw: Buffer): string {
  const head = raw.toString('utf8').split(/\r?\n\r?\n/)[0];
  return /^Subject: *(.*)$/im.exec(head)?.[1]?.trim() ?? '';
}

export async function startDownstream(
  options: {
    user?: string;
    pass?: string;
    fail?: FailMode;
    /** Per-message answer, looked at before `fail`: return a FailMode to apply to this message only. */
    decide?: (raw: Buffer) => FailMode | undefined;
  } = {},
): Promise<Downstream> {
  const received: Received[] = [];
  let mode: FailMode = options.fail ?? { kind: 'none' };
  let connections = 0;
  let authFailures = 0;
  const needAuth = options.user !== undefined;
  const server = new SMTPServer({
    authOptional: !needAuth,
    allowInsecureAuth: true,
    disabledCommands: ['STARTTLS'],
    logger: false,
    size: 50 * 1024 * 1024,
    onConnect(_session, callback) {
      connections++;
      callback();
    },
    onAuth(auth, _session, callback) {
      if (auth.username === options.user && auth.password === options.pass) return callback(null, { user: auth.username });
      authFailures++;
      const err = Object.assign(new Error('Invalid username or password'), { responseCode: 535 });
      callback(err);
    },
    onData(stream, session, callback) {
      const chunks: Buffer[] = [];
      stream.on('data', (c: Buffer) => chunks.push(c));
      stream.on('end', () => {
        const current = options.decide?.(Buffer.concat(chunks)) ?? mode;
        if (current.kind === 'reply') return callback(Object.assign(new Error(current.message), { responseCode: current.code }));
        if (current.kind === 'drop') {
          (session as unknown as { _socket?: { destroy(): void } })._socket?.destroy();
          for (const conn of server.connections) (conn as unknown as { _socket: { destroy(): void } })._socket.destroy();
          return;
        }
        const accept = (): void => {
          received.push({
            from: session.envelope.mailFrom ? session.envelope.mailFrom.address : '',
            to: session.envelope.rcptTo.map((r) => r.address),
            raw: Buffer.concat(chunks),
            user: session.user as string | undefined,
            smtpUtf8: (session.envelope as { smtpUtf8?: boolean }).smtpUtf8,
            bodyType: (session.envelope as { bodyType?: string }).bodyType,
          });
          callback(null, 'Queued');
        };
        if (current.kind === 'stall') setTimeout(accept, current.ms);
        else accept();
      });
    },
  });
  // A client that vanishes mid-conversation (a proxy killed by a test) is what a real server lives with,
  // not a reason to crash the test process with an unhandled 'error'.
  server.on('error', () => undefined);
  return {
    ...(await listenOnLoopback(server)),
    received,
    connections: () => connections,
    authFailures: () => authFailures,
    fail(next) {
      mode = next;
    },
  };
}

export interface Listening {
  readonly port: number;
  readonly addr: string;
  /** Closes every open connection, then the server. */
  close(): Promise<void>;
}

/** Starts `server` on 127.0.0.1 on a port the OS picks, and says where it listens and how to close it. */
export async function listenOnLoopback(server: SMTPServer): Promise<Listening> {
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  const port = (server.server.address() as AddressInfo).port;
  return {
    port,
    addr: `127.0.0.1:${port}`,
    close: () =>
      new Promise<void>((resolve) => {
        for (const conn of server.connections) (conn as unknown as { close(): void }).close();
        server.close(() => resolve());
      }),
  };
}

/** A port nothing listens on: bind one, note it, close it. */
export async function deadPort(): Promise<number> {
  const net = await import('node:net');
  const srv = net.createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', () => resolve()));
  const port = (srv.address() as AddressInfo).port;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  return port;
}
