// The logger keeps secrets out of every line structurally (any key named pass, password or auth, at any
// depth, in logged objects and child bindings), leaves what it was given unchanged, and writes stdout in
// batches that still reach the reader while the process runs and all of it when the process exits.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { Writable } from 'node:stream';
import { createLogger, redactSecrets } from '../src/observe/logger';

function capture() {
  const lines: Record<string, unknown>[] = [];
  const raw: string[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const line of chunk.toString('utf8').split('\n')) {
        if (!line.trim()) continue;
        raw.push(line);
        lines.push(JSON.parse(line));
      }
      done();
    },
  });
  return { logger: createLogger({ level: 'debug', destination }), lines, raw };
}

const SECRET = 'Sup3r-Secret-Value';

describe('the logger', () => {
  test('redacts pass, password and auth at every depth of a logged object, in arrays and errors too', () => {
    const { logger, lines, raw } = capture();
    const err = Object.assign(new Error('login refused'), { auth: SECRET });
    logger.info(
      {
        pass: SECRET,
        password: SECRET,
        auth: { user: 'u', pass: SECRET },
        downstream: { name: 'a', pass: SECRET, nested: { deeper: { password: SECRET } } },
        users: [{ email: 'x@y.z', password: SECRET, downstreams: [{ name: 'a', pass: SECRET }] }],
        err,
        list: [[{ auth: SECRET }]],
        kept: 'visible',
      },
      'with secrets',
    );
    expect(raw.join('\n')).not.toContain(SECRET);
    const line = lines[0];
    expect(line).toMatchObject({
      pass: '[redacted]',
      password: '[redacted]',
      auth: '[redacted]',
      downstream: { name: 'a', pass: '[redacted]', nested: { deeper: { password: '[redacted]' } } },
      users: [{ email: 'x@y.z', password: '[redacted]', downstreams: [{ name: 'a', pass: '[redacted]' }] }],
      list: [[{ auth: '[redacted]' }]],
      kept: 'visible',
      msg: 'with secrets',
    });
    // The error is still serialized as an error (its message and type survive the copy).
    expect(line.err).toMatchObject({ type: 'Error', message: 'login refused', auth: '[redacted]' });
  });

  test('redacts child bindings and grandchild bindings the same way', () => {
    const { logger, lines, raw } = capture();
    const child = logger.child({ msgId: 'M1', password: SECRET, cfg: { downstreams: [{ pass: SECRET }] } });
    child.child({ auth: { pass: SECRET } }).warn({ step: 2 }, 'grandchild');
    child.info('child');
    expect(raw.join('\n')).not.toContain(SECRET);
    expect(lines[0]).toMatchObject({ msgId: 'M1', password: '[redacted]', cfg: { downstreams: [{ pass: '[redacted]' }] }, auth: '[redacted]', step: 2 });
    expect(lines[1]).toMatchObject({ msgId: 'M1', password: '[redacted]', msg: 'child' });
  });

  test('never changes what it was given, and copies nothing when there is no secret', () => {
    const given = { a: { pass: SECRET }, b: [{ password: SECRET }], c: { d: 1 } };
    const clean = redactSecrets(given);
    expect(given.a.pass).toBe(SECRET);
    expect(given.b[0].password).toBe(SECRET);
    expect(clean).not.toBe(given);
    expect(clean.c).toBe(given.c);
    const plain = { from: 'a@b.c', attempts: [{ downstream: 'a', ok: true }], selectorResult: { kind: 'order', targets: ['a'] } };
    expect(redactSecrets(plain)).toBe(plain);
    const { logger, lines } = capture();
    logger.info(plain, 'message delivered');
    expect(lines[0]).toMatchObject({ ...plain, msg: 'message delivered' });
  });

  test('lines on stdout reach the reader while the process runs, and all of them when it exits at once', async () => {
    const logger = path.join(__dirname, '..', 'dist', 'observe', 'logger.js');
    const run = (script: string, onLine?: (line: string, stop: () => void) => void): Promise<string> =>
      new Promise((resolve, reject) => {
        const child = spawn(process.execPath, ['-e', `const { createLogger } = require(${JSON.stringify(logger)}); const log = createLogger(); ${script}`], {
          stdio: ['ignore', 'pipe', 'inherit'],
        });
        let out = '';
        child.stdout.on('data', (chunk: Buffer) => {
          out += chunk.toString('utf8');
          onLine?.(out, () => child.kill('SIGKILL'));
        });
        child.on('error', reject);
        child.on('close', () => resolve(out));
      });
    // One line, then the process stays up for 20 s: the line arrives long before (it is killed on arrival).
    const alive = await run(`log.info('first'); setTimeout(() => log.info('too late'), 20000);`, (out, stop) => {
      if (out.includes('"first"')) stop();
    });
    expect(alive).toContain('"msg":"first"');
    expect(alive).not.toContain('too late');
    // A few hundred lines, then an immediate exit: every one is written.
    const exited = await run(`for (let i = 0; i < 300; i++) log.info({ i }, 'line'); process.exit(0);`);
    const numbers = exited.trim().split('\n').map((l) => JSON.parse(l).i);
    expect(numbers).toEqual(Array.from({ length: 300 }, (_, i) => i));
  });
});
