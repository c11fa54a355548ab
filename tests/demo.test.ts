// `npm run demo` as a newcomer runs it: the demo process, swaks through it, both inboxes read over
// their HTTP API, then the demo selector edited and the routing seen to change without a restart.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { swaks } from './support/clients';

interface Ready {
  smtp: { host: string; port: number };
  inboxes: { name: string; smtpPort: number; webPort: number; webUrl: string }[];
  config: string;
  selector: string;
}

const ROOT = path.join(__dirname, '..');

async function waitFor<T>(what: string, probe: () => T | undefined | Promise<T | undefined>, timeoutMs = 15_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const value = await probe();
    if (value !== undefined) return value;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** The inbox's messages, from MailDev's REST API (a fresh connection each time: nothing left open). */
function inbox(webUrl: string): Promise<{ subject: string }[]> {
  return new Promise((resolve, reject) => {
    const request = http.get(new URL('/api/email', webUrl), { agent: false, timeout: 5000 }, (response) => {
      let body = '';
      response.setEncoding('utf8');
      response.on('data', (chunk: string) => (body += chunk));
      response.on('end', () => (response.statusCode === 200 ? resolve(JSON.parse(body)) : reject(new Error(`GET /api/email: ${response.statusCode}`))));
    });
    request.on('timeout', () => request.destroy(new Error('GET /api/email timed out')));
    request.on('error', reject);
  });
}

describe('npm run demo', () => {
  let demo: ChildProcess;
  let output = '';
  let dir: string;
  let ready: Ready;

  beforeAll(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'smtpmux-demo-'));
    // Started as `node scripts/demo.js` (what `npm run demo` runs after the build), on free ports.
    demo = spawn(process.execPath, [path.join(ROOT, 'scripts', 'demo.js')], {
      cwd: ROOT,
      env: {
        ...process.env,
        SMTPMUX_DEMO_DIR: dir,
        SMTPMUX_PORT: '0',
        SMTPMUX_HTTP_PORT: '0',
        DEMO_INBOX1_PORT: '0',
        DEMO_INBOX1_WEB_PORT: '0',
        DEMO_INBOX2_PORT: '0',
        DEMO_INBOX2_WEB_PORT: '0',
        SMTPMUX_DEMO_LOG: 'json',
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    demo.stdout!.on('data', (chunk) => (output += chunk));
    demo.stderr!.on('data', (chunk) => (output += chunk));
    ready = await waitFor('the demo to be ready', () => {
      const line = output.split('\n').find((l) => l.startsWith('demo ready '));
      return line ? (JSON.parse(line.slice('demo ready '.length)) as Ready) : undefined;
    }, 30_000);
  }, 45_000);

  /** Sends SIGTERM and resolves with the exit code, or null if the demo did not stop within 15 s. */
  async function stopDemo(): Promise<number | null> {
    if (demo.exitCode !== null) return demo.exitCode;
    const exited = new Promise<number | null>((resolve) => demo.once('exit', (code) => resolve(code)));
    demo.kill('SIGTERM');
    let timer: NodeJS.Timeout | undefined;
    const code = await Promise.race([exited, new Promise<null>((r) => (timer = setTimeout(() => r(null), 15_000)))]);
    clearTimeout(timer);
    return code;
  }

  afterAll(async () => {
    if (demo && (await stopDemo()) === null) demo.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  });

  test('prints where everything is: the SMTP port, both inboxes, the files to edit and a swaks command', () => {
    expect(ready.inboxes).toHaveLength(2);
    expect(ready.config).toBe(path.join(dir, 'config.yaml'));
    expect(ready.selector).toBe(path.join(dir, 'selector.js'));
    expect(output).toContain('swaks');
    expect(output).toMatch(/swaks .*--tls/);
    for (const box of ready.inboxes) expect(output).toContain(box.webUrl);
  });

  test('swaks through the demo lands mail alternately in the two inboxes, then an edited selector reroutes it live', async () => {
    for (let i = 0; i < 4; i++) {
      const sent = await swaks(ready.smtp.port, ['--tls', '--header', `Subject: demo ${i}`]);
      expect(sent.code).toBe(0);
    }
    const [first, second] = ready.inboxes;
    const before = await waitFor('four messages in the inboxes', async () => {
      const counts = [(await inbox(first.webUrl)).length, (await inbox(second.webUrl)).length];
      return counts[0] + counts[1] === 4 ? counts : undefined;
    });
    expect(before).toEqual([2, 2]);

    // The newcomer's edit: everything to the second inbox. No restart.
    const source = readFileSync(ready.selector, 'utf8');
    writeFileSync(ready.selector, `${source}\nfunction select() { return '${second.name}'; }\n`);
    await waitFor('the reload', () => (/"msg":"reloaded"/.test(output) ? true : undefined));
    for (let i = 0; i < 3; i++) expect((await swaks(ready.smtp.port, ['--tls', '--header', `Subject: after edit ${i}`])).code).toBe(0);
    const after = await waitFor('three more messages in the second inbox', async () => {
      const subjects = (await inbox(second.webUrl)).map((m) => m.subject);
      return subjects.filter((s) => s.startsWith('after edit')).length === 3 ? subjects : undefined;
    });
    expect(after.filter((s) => s.startsWith('after edit'))).toHaveLength(3);
    expect((await inbox(first.webUrl)).length).toBe(2);
  }, 60_000);

  test('Ctrl+C (SIGTERM) stops the proxy and both inboxes and exits 0', async () => {
    expect(await stopDemo()).toBe(0);
    const net = await import('node:net');
    for (const port of [ready.smtp.port, ...ready.inboxes.map((b) => b.smtpPort)]) {
      const refused = await new Promise<boolean>((resolve) => {
        const socket = net.connect({ host: '127.0.0.1', port });
        socket.once('connect', () => (socket.destroy(), resolve(false)));
        socket.once('error', () => resolve(true));
      });
      expect(refused).toBe(true);
    }
  }, 30_000);
});
