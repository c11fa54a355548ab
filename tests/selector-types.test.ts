// selectors/smtpmux.d.ts is what script authors read; the host builds the real objects. A field added on
// one side and not the other would mislead every editor, so the two are compared here.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { summarize } from '../src/message/summary';
import { SEND_CODES, STATE_CODES } from '../src/errors';
import { Runtime } from '../src/runtime';
import { parseConfig } from '../src/config/load';

const dts = readFileSync(path.join(__dirname, '..', 'selectors', 'smtpmux.d.ts'), 'utf8');

/** The member names of one interface in the d.ts. */
function members(name: string): string[] {
  const body = new RegExp(`interface ${name} \\{([\\s\\S]*?)\\n\\}`).exec(dts)?.[1] ?? '';
  return [...body.matchAll(/^\s*readonly (\w+)\??:/gm)].map((m) => m[1]).sort();
}

test('the Message type script authors see lists exactly the fields a selector is given', () => {
  const message = summarize({ id: 'X', user: 'u@example.com', from: 'a@example.com', to: ['b@example.org'], size: 1, clientAddress: '127.0.0.1' }, 'Subject: hi\r\n');
  expect(members('Message')).toEqual(Object.keys(message).sort());
});

test('the Downstream type script authors see lists exactly the fields a selector is given, and no credentials', async () => {
  const text = `users:
  - email: u@example.com
    password: pw
    selector: round-robin.js
    downstreams:
      - { name: a, addr: "127.0.0.1:25", user: secret-user, pass: secret-pass, tls: none, tags: [x], weight: 2 }
`;
  const { runtime } = await Runtime.build(await parseConfig(text, path.join(__dirname, 'virtual.yaml'), {}));
  try {
    const [view] = await runtime.user('u@example.com')!.views();
    expect(members('Downstream')).toEqual(Object.keys(view).sort());
    expect(JSON.stringify(view)).not.toMatch(/secret/);
  } finally {
    runtime.retire();
  }
});

test('every SMTPMUX_* code send() can throw is in the SendErrorCode type', () => {
  for (const code of Object.keys(SEND_CODES)) expect(dts).toContain(`'${code}'`);
});

test('every code a ctx.state call can reject with is in the StateErrorCode type', () => {
  const body = /type StateErrorCode =([\s\S]*?);\n/.exec(dts)?.[1] ?? '';
  for (const code of Object.keys(STATE_CODES)) expect(body).toContain(`'${code}'`);
});

test('the Ctx type lists what select() gets as its third argument', () => {
  expect(/interface Ctx \{[\s\S]*?\n\}/.exec(dts)?.[0]).toMatch(/send\(ds[\s\S]*log\([\s\S]*readonly state: State;/);
});
