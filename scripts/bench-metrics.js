#!/usr/bin/env node
// What the metrics cost one message, measured in-process where machine noise cannot hide it: the calls
// the proxy makes per message (one messages_total increment and duration observation, one selector
// observation, one attempt increment per attempt, the status page's recent-activity record), timed over
// many iterations; and what one scrape of /metrics costs with many users and downstreams configured.
// Prints figures, checks nothing.
//
//   npm run build && node scripts/bench-metrics.js [--iterations 200000] [--users 50] [--downstreams 4]
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');

const ROOT = path.resolve(__dirname, '..');
const { Metrics } = require(path.join(ROOT, 'dist', 'observe', 'metrics.js'));

const { values } = parseArgs({
  options: {
    iterations: { type: 'string', default: '200000' },
    users: { type: 'string', default: '50' },
    downstreams: { type: 'string', default: '4' },
  },
});
const ITERATIONS = Number(values.iterations);
const USERS = Number(values.users);
const DOWNSTREAMS = Number(values.downstreams);

const users = Array.from({ length: USERS }, (_, u) => ({
  email: `app${u}@example.com`,
  downstreams: Array.from({ length: DOWNSTREAMS }, (_, d) => ({ name: `ds${u}-${d}` })),
}));

function perMessage(metrics, i) {
  const user = users[i % USERS];
  const outcome = i % 10 === 0 ? 'deferred' : 'delivered';
  metrics.selectorRun(0.0004);
  // A failover now and then: two attempts, else one.
  if (outcome === 'deferred' || i % 7 === 0) metrics.attempt(user.email, user.downstreams[1].name, 'temporary', 12);
  if (outcome === 'delivered') metrics.attempt(user.email, user.downstreams[0].name, 'ok', 8);
  metrics.message(user.email, outcome, 0.012);
}

function time(label, fn, n) {
  const started = process.hrtime.bigint();
  for (let i = 0; i < n; i++) fn(i);
  const ns = Number(process.hrtime.bigint() - started) / n;
  console.log(`${label.padEnd(46)} ${ns.toFixed(0).padStart(7)} ns`);
  return ns;
}

async function main() {
  console.log(`metrics cost: ${ITERATIONS} messages, ${USERS} users x ${DOWNSTREAMS} downstreams, Node ${process.version}`);
  const metrics = new Metrics();
  metrics.declare(users);
  metrics.setSources({ connections: () => 8, downstreams: () => users.flatMap((u) => u.downstreams.map((d) => ({ user: u.email, downstream: d.name, up: true }))) });
  time('warm-up', (i) => perMessage(metrics, i), ITERATIONS / 4);
  const best = [];
  for (let round = 0; round < 5; round++) best.push(time(`per message (round ${round + 1})`, (i) => perMessage(metrics, i), ITERATIONS));
  const min = Math.min(...best);
  console.log(`per message, best of 5: ${min.toFixed(0)} ns = ${(min / 1000).toFixed(2)} µs of CPU`);

  const scrapes = 50;
  let bytes = 0;
  const started = process.hrtime.bigint();
  for (let i = 0; i < scrapes; i++) bytes = (await metrics.exposition()).length;
  const ms = Number(process.hrtime.bigint() - started) / 1e6 / scrapes;
  console.log(`one scrape of /metrics: ${ms.toFixed(2)} ms, ${(bytes / 1024).toFixed(0)} KiB of text`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
