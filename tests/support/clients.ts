// Real SMTP clients, used the way users use them: nodemailer in-process, swaks and python's smtplib
// as separate processes.
import { execFile } from 'node:child_process';
import nodemailer from 'nodemailer';

export interface Sent {
  readonly ok: boolean;
  readonly code?: number;
  readonly response: string;
}

export async function sendWithNodemailer(
  port: number,
  message: { from?: string; to?: string | string[]; subject?: string; text?: string; raw?: string | Buffer; attachments?: { filename: string; content: Buffer }[] },
  auth: { user: string; pass: string } | null = { user: 'test@user.com', pass: 'password123' },
  /** `localAddress`: the client's own address (loopback has all of 127.0.0.0/8). */
  options: { localAddress?: string } = {},
): Promise<Sent> {
  const transport = nodemailer.createTransport({
    host: '127.0.0.1',
    port,
    localAddress: options.localAddress,
    secure: false,
    ignoreTLS: true,
    auth: auth ?? undefined,
    connectionTimeout: 10_000,
    socketTimeout: 60_000,
  });
  try {
    const from = message.from ?? 'app@example.com';
    const to = message.to ?? 'someone@example.org';
    const info = message.raw
      ? await transport.sendMail({ envelope: { from, to }, raw: message.raw })
      : await transport.sendMail({ from, to, subject: message.subject ?? 'hello', text: message.text ?? 'hello there', attachments: message.attachments });
    return { ok: true, code: 250, response: String(info.response) };
  } catch (err) {
    const e = err as { responseCode?: number; response?: string; message: string };
    return { ok: false, code: e.responseCode, response: e.response ?? e.message };
  } finally {
    transport.close();
  }
}

export function run(cmd: string, args: string[], timeoutMs = 30_000, input?: string): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = execFile(cmd, args, { timeout: timeoutMs, maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as NodeJS.ErrnoException).code === 'number' ? Number((err as NodeJS.ErrnoException).code) : 1) : 0;
      resolve({ code, stdout: String(stdout), stderr: String(stderr) });
    });
    if (input !== undefined) child.stdin?.end(input);
  });
}

export function swaks(port: number, extra: string[] = []): Promise<{ code: number; stdout: string; stderr: string }> {
  return run('swaks', [
    '--server', `127.0.0.1:${port}`,
    '--to', 'hello@smtpmux.what',
    '--from', 'curious@user.com',
    '-a', 'PLAIN',
    '--auth-user', 'test@user.com',
    '--auth-password', 'password123',
    '--body', 'hello user',
    '--timeout', '30',
    ...extra,
  ]);
}

export const PYTHON_SEND = `
import smtplib, sys, json
port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
msg = sys.stdin.buffer.read()
try:
    with smtplib.SMTP('127.0.0.1', port, timeout=30) as s:
        s.ehlo()
        s.login(user, password)
        refused = s.sendmail('py@example.com', ['rcpt@example.org'], msg)
        code, resp = s.noop()
        print(json.dumps({'ok': True}))
except smtplib.SMTPResponseException as e:
    print(json.dumps({'ok': False, 'code': e.smtp_code, 'response': e.smtp_error.decode('utf-8', 'replace')}))
except smtplib.SMTPRecipientsRefused as e:
    print(json.dumps({'ok': False, 'refused': str(e)}))
`;

export async function sendWithPython(port: number, raw: string, user = 'test@user.com', pass = 'password123'): Promise<{ ok: boolean; code?: number; response?: string }> {
  const result = await run('python3', ['-c', PYTHON_SEND, String(port), user, pass], 30_000, raw);
  return JSON.parse(result.stdout.trim() || JSON.stringify({ ok: false, response: result.stderr }));
}
