// `smtpmux tls selfsigned DIR`: writes DIR/fullchain.pem and DIR/privkey.pem (the names certbot uses)
// for a test setup, and prints the `tls:` lines for the config.
import { constants, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { selfSigned } from '../tls/selfsigned';

export const TLS_USAGE = `Usage: smtpmux tls selfsigned DIR [--name NAME]... [--days N] [--force]

Writes a self-signed certificate (DIR/fullchain.pem) and its private key (DIR/privkey.pem, mode 600)
for a test setup. Clients must be told to trust it, or not to verify it.

Options:
  --name NAME   a DNS name or IP address the certificate is for (repeatable; default: localhost,
                this machine's name, 127.0.0.1 and ::1)
  --days N      validity in days (default 365)
  --force       replace existing files`;

export async function runTls(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    options: { name: { type: 'string', multiple: true }, days: { type: 'string' }, force: { type: 'boolean' } },
    allowPositionals: true,
  });
  const [sub, dir] = positionals;
  if (sub !== 'selfsigned' || !dir || positionals.length > 2) {
    console.error(TLS_USAGE);
    return 2;
  }
  const days = values.days === undefined ? 365 : Number(values.days);
  if (!Number.isInteger(days) || days < 1 || days > 3650) {
    console.error(`smtpmux tls: --days must be a whole number from 1 to 3650, not "${values.days}"`);
    return 2;
  }
  const names = values.name?.length ? values.name : [...new Set(['localhost', os.hostname(), '127.0.0.1', '::1'])];
  const certFile = path.resolve(dir, 'fullchain.pem');
  const keyFile = path.resolve(dir, 'privkey.pem');
  await fs.mkdir(path.resolve(dir), { recursive: true });
  const made = selfSigned(names, days);
  const flag = values.force ? 'w' : 'wx';
  try {
    await fs.writeFile(keyFile, made.key, { mode: 0o600, flag });
    await fs.chmod(keyFile, 0o600);
    await fs.writeFile(certFile, made.cert, { mode: 0o644, flag });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
      console.error(`smtpmux tls: ${(err as NodeJS.ErrnoException).path} exists; use --force to replace it`);
      return 1;
    }
    throw err;
  }
  await fs.access(keyFile, constants.R_OK);
  console.log(`wrote ${certFile} and ${keyFile} (self-signed for ${names.join(', ')}, valid until ${made.notAfter.toISOString().slice(0, 10)})

tls:
  cert: ${certFile}
  key: ${keyFile}`);
  return 0;
}
