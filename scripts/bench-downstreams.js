#!/usr/bin/env node
// What knowing the downstreams costs a message, measured in-process (no network): the per-message
// snapshot a selector gets (`views()`) plus one gate admission and settlement, over the in-memory
// StateStore, for three downstreams without limits and with cooldown + rate + quota on each.
//
//   npm run build && node scripts/bench-downstreams.js [--messages 20000]
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const { parseConfig } = require('../dist/config/load');
const { Runtime } = require('../dist/runtime');

const { values } = parseArgs({ options: { messages: { type: 'string', default: '20000' } } });
const MESSAGES = Number(values.messages);

function configText(limits) {
  const ds = ['a', 'b', 'c']
    .map((n, i) => `      - { name: ${n}, addr: "127.0.0.1:${2600 + i}"${limits ? ', cooldown: 60s, rate: 1000000/s, quota: 100000000/24h' : ''} }`)
    .join('\n');
  return `users:\n  - email: u@example.com\n    password: pw\n    selector: round-robin.js\n    downstreams:\n${ds}\n`;
}

async function measure(limits) {
  const config = await parseConfig(configText(limits), path.join(__dirname, 'bench-downstreams.yaml'), {});
  const { runtime } = await Runtime.build(config);
  const user = runtime.user('u@example.com');
  const gate = user.targets.get('a').gate;
  const once = async (i) => {
    await user.views();
    const admission = await gate.admit({ id: `m${i}`, recipients: 1, maxWaitMs: 1000 });
    await gate.settle(admission, null);
  };
  for (let i = 0; i < 2000; i++) await once(i); // warm up
  const started = process.hrtime.bigint();
  for (let i = 0; i < MESSAGES; i++) await once(i);
  const us = Number(process.hrtime.bigint() - started) / 1000 / MESSAGES;
  runtime.retire();
  return us;
}

(async () => {
  console.log(`state checks per message (views of 3 downstreams + one admit/settle), ${MESSAGES} messages, Node ${process.version}`);
  for (const limits of [false, true]) {
    const runs = [];
    for (let r = 0; r < 3; r++) runs.push(await measure(limits));
    runs.sort((x, y) => x - y);
    console.log(`${limits ? 'cooldown + rate + quota on each' : 'no limits configured         '}  median ${runs[1].toFixed(1)} µs  (runs: ${runs.map((x) => x.toFixed(1)).join(', ')})`);
  }
})();
