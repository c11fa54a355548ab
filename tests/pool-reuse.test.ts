// Pooled downstream connections go stale: a server (or a NAT box) drops an idle connection and the next
// message finds out only when it tries to use it. No byte of that message was sent, so it must go out
// over a fresh connection, not fail over or come back 451. A message whose bytes were sent is never
// sent again by the pool (that would be a duplicate): see the passthrough and routing tests.
import { createHash } from 'node:crypto';
import { SMTPServer } from 'smtp-server';
import { listenOnLoopback } from './support/downstream';
import { testConfig } from './support/config';
import { startProxy, type RunningProxy } from './support/proxy';
import { sendWithNodemailer } from './support/clients';

describe('pooled downstream connections', () => {
  test.each([
    ['in memory', 0],
    // Past a quarter of the in-memory budget (BodyMemory): spills.
    ['spilled to a temp file', 7 * 1024 * 1024],
  ])('a pooled connection the downstream dropped is replaced, and the message (%s) still goes whole to that downstream', async (_kind, attachmentBytes) => {
    const subjects: string[] = [];
    const bodies: Buffer[] = [];
    let connections = 0;
    let dropped = 0;
    const server = new SMTPServer({
      authOptional: true,
      disabledCommands: ['STARTTLS'],
      logger: false,
      onConnect(_session, callback) {
        connections++;
        callback();
      },
      onMailFrom(_address, session, callback) {
        // The second message on a connection finds it gone, as after an idle timeout the client missed.
        if (session.transaction > 1 && dropped === 0) {
          dropped++;
          for (const conn of server.connections) (conn as unknown as { _socket: { destroy(): void } })._socket.destroy();
          return;
        }
        callback();
      },
      onData(stream, _session, callback) {
        const chunks: Buffer[] = [];
        stream.on('data', (c: Buffer) => chunks.push(c));
        stream.on('end', () => {
          const raw = Buffer.concat(chunks);
          subjects.push(/^Subject: (.*)$/m.exec(raw.subarray(0, 4096).toString())?.[1]?.trim() ?? '');
          bodies.push(raw);
          callback(null, 'OK');
        });
      },
    });
    const downstream = await listenOnLoopback(server);
    let proxy: RunningProxy | undefined;
    try {
      proxy = await startProxy({ 'config.yaml': testConfig({ selector: 'round-robin.js', downstreams: [{ name: 'only', addr: downstream.addr }] }) });
      const filler = 'x'.repeat(998) + '\r\n';
      const sent = ['first', 'second', 'third'].map((subject) =>
        Buffer.from(`From: <a@example.com>\r\nTo: <b@example.org>\r\nSubject: ${subject}\r\n\r\n${filler.repeat(Math.ceil(attachmentBytes / filler.length) + 1)}`),
      );
      for (const raw of sent) expect(await sendWithNodemailer(proxy.port, { raw })).toMatchObject({ ok: true });
      // Each message arrived whole, byte for byte, the requeued one included.
      // (Compared by digest: a deep equality of multi-megabyte Buffers takes Jest most of a minute.)
      const digest = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
      expect(bodies.map(digest)).toEqual(sent.map(digest));
      expect(dropped).toBe(1);
      expect(subjects).toEqual(['first', 'second', 'third']);
      expect(connections).toBe(2);
    } finally {
      await proxy?.stop();
      await downstream.close();
    }
  });
});
