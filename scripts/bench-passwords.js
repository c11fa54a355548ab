#!/usr/bin/env node
// What one login costs with each kind of stored password, and how long the event loop stalls meanwhile.
// Runs on the built code (npm run build first):  node scripts/bench-passwords.js [logins]
// Prints, per scheme: ms per verification one at a time, logins/s with 8 at once, and the longest
// event-loop delay seen while they ran (what every other connection waits at worst).
'use strict';
const { performance, monitorEventLoopDelay } = require('node:perf_hooks');
const bcrypt = require('bcryptjs');
const { hashPassword, storedPassword } = require('../dist/auth/password');

const N = Number(process.argv[2] || 40);

async function measure(label, stored) {
  const password = storedPassword(stored);
  if (!(await password.verify('correct horse'))) throw new Error(`${label}: verification failed`);
  let started = performance.now();
  for (let i = 0; i < N; i++) await password.verify(i % 2 ? 'correct horse' : 'wrong');
  const serial = (performance.now() - started) / N;
  const delay = monitorEventLoopDelay({ resolution: 1 });
  delay.enable();
  started = performance.now();
  for (let i = 0; i < N; i += 8) await Promise.all(Array.from({ length: 8 }, () => password.verify('correct horse')));
  const parallel = N / ((performance.now() - started) / 1000);
  delay.disable();
  console.log(`${label.padEnd(34)} ${serial.toFixed(2).padStart(8)} ms/verify   ${parallel.toFixed(0).padStart(6)} logins/s (8 at once)   event loop max delay ${(delay.max / 1e6).toFixed(1)} ms`);
}

(async () => {
  console.log(`node ${process.version}, ${require('node:os').cpus().length} CPUs, ${N} logins per row`);
  await measure('plaintext', 'correct horse');
  await measure('argon2id (m=19456,t=2,p=1, default)', await hashPassword('correct horse'));
  await measure('bcrypt cost 5 (htpasswd -B default)', bcrypt.hashSync('correct horse', 5).replace(/^\$2b\$/, '$2y$'));
  await measure('bcrypt cost 10', bcrypt.hashSync('correct horse', 10));
})();
