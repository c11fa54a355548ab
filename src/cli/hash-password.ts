// `smtpmux hash-password`: reads a password from stdin and prints its argon2id hash for `password:`.
// On a terminal it asks twice without echoing; from a pipe it reads everything (one trailing newline is
// dropped), so `printf %s "$PW" | smtpmux hash-password` works in scripts.
import { hashPassword } from '../auth/password';

/** One line typed on the terminal, not echoed. Rejects on Ctrl+C or Ctrl+D. */
function readHidden(prompt: string): Promise<string> {
  const input = process.stdin;
  // Echo off before the prompt shows: what is typed as soon as it appears must not be echoed either.
  input.setRawMode(true);
  process.stderr.write(prompt);
  return new Promise((resolve, reject) => {
    let line = '';
    input.resume();
    input.setEncoding('utf8');
    const done = (err?: Error): void => {
      input.off('data', onData);
      input.setRawMode(false);
      input.pause();
      process.stderr.write('\n');
      if (err) reject(err);
      else resolve(line);
    };
    const onData = (chunk: string): void => {
      for (const char of chunk) {
        if (char === '\r' || char === '\n') return done();
        if (char === '\u0003' || char === '\u0004') return done(new Error('cancelled'));
        if (char === '\u007f' || char === '\b') line = line.slice(0, -1);
        else line += char;
      }
    };
    input.on('data', onData);
  });
}

async function readPiped(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8').replace(/\r?\n$/, '');
}

export async function runHashPassword(): Promise<number> {
  let password: string;
  try {
    if (process.stdin.isTTY) {
      password = await readHidden('Password: ');
      if ((await readHidden('Again: ')) !== password) {
        console.error('smtpmux hash-password: the two passwords differ; nothing printed');
        return 1;
      }
    } else {
      password = await readPiped();
    }
  } catch (err) {
    console.error(`smtpmux hash-password: ${(err as Error).message}`);
    return 130;
  }
  if (password === '') {
    console.error('smtpmux hash-password: the password is empty; type it on the terminal or pipe it in (printf %s "$PASSWORD" | smtpmux hash-password)');
    return 1;
  }
  console.log(await hashPassword(password));
  return 0;
}
