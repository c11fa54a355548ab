// The error catalogue is documentation: the README's table must list every code with its reply.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { CATALOGUE } from '../src/errors';

test('the README lists every error of the catalogue with its reply and sentence', () => {
  const readme = readFileSync(path.join(__dirname, '..', 'README.md'), 'utf8');
  const table = /<!-- errors:begin -->([\s\S]*?)<!-- errors:end -->/.exec(readme)?.[1] ?? '';
  const rows = table
    .split('\n')
    .map((line) => /^\| `(\w+)` \| (\d{3}) (\d\.\d{1,3}\.\d{1,3}) \| (.*) \|$/.exec(line.trim()))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => [m[1], { reply: Number(m[2]), enhanced: m[3], text: m[4] }] as const);
  expect(Object.fromEntries(rows)).toEqual(CATALOGUE);
});
