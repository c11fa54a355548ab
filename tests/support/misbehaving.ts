// A raw TCP downstream that misbehaves in ways smtp-server cannot be told to: it greets with a 5xx,
// trickles `250-` continuation lines forever, or goes silent after the final dot. Each connection gets
// the behaviour `plan` picks for it (by connection number, from 1); 'ok' speaks just enough SMTP to
// accept a message, so a test can show that the next message is not stuck behind the last one.
import net, { type AddressInfo } from 'node:net';

export type Behaviour = 'ok' | 'greet-554' | 'trickle-ehlo' | 'hang-after-data';

export interface Misbehaving {
  readonly port: number;
  readonly addr: string;
  /** Connections opened so far. */
  connections(): number;
  /** Connections the client closed (or we did) so far. */
  closed(): number;
  /** Messages accepted (final dot answered 250). */
  accepted(): number;
  close(): Promise<void>;
}

export async function startMisbehaving(plan: (connection: number) => Behaviour): Promise<Misbehaving> {
  let connections = 0;
  let closed = 0;
  let accepted = 0;
  const sockets = new Set<net.Socket>();
  const timers = new Set<NodeJS.Timeout>();
  const server = net.createServer((socket) => {
    const behaviour = plan(++connections);
    sockets.add(socket);
    socket.setNoDelay(true);
    socket.on('error', () => undefined);
    socket.on('close', () => {
      closed++;
      sockets.delete(socket);
    });
    const say = (line: string): void => {
      if (!socket.destroyed) socket.write(`${line}\r\n`);
    };
    if (behaviour === 'greet-554') {
      say('554 5.7.1 Service unavailable; client host blocked');
      return;
    }
    say('220 misbehaving.test ESMTP');
    let buffered = '';
    let inData = false;
    socket.on('data', (chunk: Buffer) => {
      buffered += chunk.toString('latin1');
      let at: number;
      while ((at = buffered.indexOf('\r\n')) >= 0) {
        const line = buffered.slice(0, at);
        buffered = buffered.slice(at + 2);
        if (inData) {
          if (line !== '.') continue;
          inData = false;
          if (behaviour === 'hang-after-data') continue; // never a reply
          accepted++;
          say('250 2.0.0 Ok: queued');
          continue;
        }
        const verb = line.slice(0, 4).toUpperCase();
        if (verb === 'EHLO' && behaviour === 'trickle-ehlo') {
          // A continuation line every 100 ms, forever: an idle timeout never fires.
          const timer = setInterval(() => say('250-still thinking'), 100);
          timers.add(timer);
          socket.on('close', () => clearInterval(timer));
          continue;
        }
        if (verb === 'EHLO') say('250-misbehaving.test\r\n250 8BITMIME');
        else if (verb === 'HELO' || verb === 'MAIL' || verb === 'RCPT' || verb === 'RSET' || verb === 'NOOP') say('250 2.0.0 Ok');
        else if (verb === 'DATA') {
          inData = true;
          say('354 End data with <CR><LF>.<CR><LF>');
        } else if (verb === 'QUIT') {
          say('221 2.0.0 Bye');
          socket.end();
        } else say('502 5.5.2 Command not implemented');
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  const port = (server.address() as AddressInfo).port;
  return {
    port,
    addr: `127.0.0.1:${port}`,
    connections: () => connections,
    closed: () => closed,
    accepted: () => accepted,
    close: () =>
      new Promise<void>((resolve) => {
        for (const timer of timers) clearInterval(timer);
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}
