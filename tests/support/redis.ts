// A real redis-server (the Debian package) for one test file: on a free loopback port, nothing written to
// disk, stopped by the test. It can be killed, paused (SIGSTOP: a hung server) and started again on the
// same port, which is what the fallback tests need.
import { spawn, type ChildProcess } from 'node:child_process';
import net from 'node:net';

export interface RedisServer {
  readonly port: number;
  readonly url: string;
  /** Starts it again on the same port after kill(). */
  start(): Promise<void>;
  /** SIGKILL: the data is gone (nothing is saved). */
  kill(): Promise<void>;
  /** SIGSTOP / SIGCONT: a server that holds connections open and answers nothing. */
  pause(): void;
  resume(): void;
  /** One command through redis-cli; its output. */
  cli(...args: string[]): Promise<string>;
  stop(): Promise<void>;
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

function answers(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: '127.0.0.1', port });
    const done = (ok: boolean): void => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(500, () => done(false));
    socket.once('error', () => done(false));
    socket.once('connect', () => socket.write('PING\r\n'));
    // -NOAUTH is an answer too: the server is up and wants a password.
    socket.once('data', (chunk) => done(/^(\+PONG|-NOAUTH)/.test(chunk.toString())));
  });
}

export async function startRedis(options: { password?: string } = {}): Promise<RedisServer> {
  let child: ChildProcess | undefined;
  let port = await freePort();
  const auth = options.password === undefined ? [] : ['--requirepass', options.password];

  const launch = async (): Promise<void> => {
    const proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--loglevel', 'warning', ...auth], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    child = proc;
    const deadline = Date.now() + 10_000;
    while (Date.now() < deadline) {
      if (proc.exitCode !== null || proc.signalCode !== null) throw new Error(`redis-server exited (${proc.exitCode ?? proc.signalCode}) on port ${port}`);
      if (await answers(port)) return;
      await new Promise((r) => setTimeout(r, 25));
    }
    proc.kill('SIGKILL');
    throw new Error(`redis-server did not answer on port ${port} within 10 s`);
  };

  const kill = async (): Promise<void> => {
    const proc = child;
    child = undefined;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    const exited = new Promise((r) => proc.once('exit', r));
    proc.kill('SIGCONT');
    proc.kill('SIGKILL');
    await exited;
  };

  // Another process may take the port between freePort() and the launch: try a few.
  for (let attempt = 0; ; attempt++) {
    try {
      await launch();
      break;
    } catch (err) {
      if (attempt >= 3) throw err;
      port = await freePort();
    }
  }

  return {
    port,
    url: `redis://${options.password === undefined ? '' : `:${encodeURIComponent(options.password)}@`}127.0.0.1:${port}`,
    start: launch,
    kill,
    pause: () => child?.kill('SIGSTOP'),
    resume: () => child?.kill('SIGCONT'),
    cli: (...args: string[]) =>
      new Promise((resolve, reject) => {
        const proc = spawn('redis-cli', ['-p', String(port), ...(options.password === undefined ? [] : ['--no-auth-warning', '-a', options.password]), ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
        let out = '';
        proc.stdout.on('data', (c: Buffer) => (out += c.toString()));
        proc.once('error', reject);
        proc.once('exit', () => resolve(out.trim()));
      }),
    stop: kill,
  };
}
