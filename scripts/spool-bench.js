#!/usr/bin/env node
// How to store a spooled message body, measured, not asserted: prints figures, checks nothing.
//
//   node scripts/spool-bench.js [--runs 40] [--dir /path/on/the/spool/disk]
//
// Two ways to make one message durable (what must happen before `250 Queued`), each with a 50 KB and a
// 5 MB body, p50 and p90 over --runs writes (5 MB: a quarter of the runs):
//   sqlite  the body as a BLOB in the schedule row: one INSERT, one commit (WAL, synchronous=FULL);
//   file    the body in its own file (write temp, fsync, rename, fsync the folder), then the schedule
//           row without the body in SQLite: one more commit.
// Also how much the process's RSS grows while a 5 MB body is stored each way: SQLite needs the whole
// body in one Buffer to bind it; a file is written from a stream in chunks.
'use strict';

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { parseArgs } = require('node:util');
const { DatabaseSync } = require('node:sqlite');

const { values } = parseArgs({ options: { runs: { type: 'string', default: '40' }, dir: { type: 'string' } } });
const RUNS = Number(values.runs);
const dir = fs.mkdtempSync(path.join(values.dir ?? os.tmpdir(), 'spool-bench-'));

function openDb(name) {
  const db = new DatabaseSync(path.join(dir, name));
  db.exec('PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;');
  db.exec('CREATE TABLE IF NOT EXISTS m (id TEXT PRIMARY KEY, meta TEXT NOT NULL, body BLOB, file TEXT)');
  return db;
}

const sqliteDb = openDb('blob.sqlite');
const insertBlob = sqliteDb.prepare('INSERT INTO m (id, meta, body) VALUES (?, ?, ?)');
const fileDb = openDb('file.sqlite');
const insertRow = fileDb.prepare('INSERT INTO m (id, meta, file) VALUES (?, ?, ?)');
const bodies = path.join(dir, 'bodies');
fs.mkdirSync(bodies);
const meta = JSON.stringify({ from: 'app@example.com', to: ['someone@example.org'], user: 'app@example.com' });

function viaSqlite(id, body) {
  insertBlob.run(id, meta, body);
}

function viaFile(id, body) {
  const tmp = path.join(bodies, `${id}.tmp`);
  const final = path.join(bodies, `${id}.eml`);
  const fd = fs.openSync(tmp, 'w', 0o600);
  // Written in 64 KB slices, as a stream from the client or the spill file would arrive.
  for (let at = 0; at < body.length; at += 65536) fs.writeSync(fd, body, at, Math.min(65536, body.length - at));
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  fs.renameSync(tmp, final);
  const dfd = fs.openSync(bodies, 'r');
  fs.fsyncSync(dfd);
  fs.closeSync(dfd);
  insertRow.run(id, meta, final);
}

function measure(label, fn, size, runs) {
  const body = Buffer.alloc(size, 'x');
  const times = [];
  for (let i = 0; i < runs; i++) {
    const started = process.hrtime.bigint();
    fn(`${label}-${size}-${i}`, body);
    times.push(Number(process.hrtime.bigint() - started) / 1e6);
  }
  times.sort((a, b) => a - b);
  const at = (q) => times[Math.min(times.length - 1, Math.floor(q * times.length))].toFixed(2);
  return { p50: at(0.5), p90: at(0.9) };
}

function rssGrowth(fn, size) {
  global.gc?.();
  const before = process.memoryUsage().rss;
  let peak = before;
  // The body as the caller must hold it: SQLite binds one Buffer; the file path takes 64 KB slices.
  if (fn === viaSqlite) {
    const body = Buffer.alloc(size, 'y');
    peak = Math.max(peak, process.memoryUsage().rss);
    fn(`rss-sqlite-${size}`, body);
    peak = Math.max(peak, process.memoryUsage().rss);
  } else {
    const slice = Buffer.alloc(65536, 'y');
    const id = `rss-file-${size}`;
    const tmp = path.join(bodies, `${id}.tmp`);
    const fd = fs.openSync(tmp, 'w', 0o600);
    for (let at = 0; at < size; at += slice.length) fs.writeSync(fd, slice, 0, Math.min(slice.length, size - at));
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fs.renameSync(tmp, path.join(bodies, `${id}.eml`));
    insertRow.run(id, meta, id);
    peak = Math.max(peak, process.memoryUsage().rss);
  }
  return ((peak - before) / 1024 / 1024).toFixed(1);
}

const rows = [];
for (const size of [50 * 1024, 5 * 1024 * 1024]) {
  const runs = size > 1024 * 1024 ? Math.max(5, Math.floor(RUNS / 4)) : RUNS;
  const a = measure('sqlite', viaSqlite, size, runs);
  const b = measure('file', viaFile, size, runs);
  rows.push({ size: size >= 1024 * 1024 ? `${size / 1024 / 1024} MB` : `${size / 1024} KB`, runs, sqlite: a, file: b });
}
console.log(`spool body storage, ${os.cpus().length} cores, ${dir}`);
console.log('size    runs  sqlite p50/p90 ms   file+row p50/p90 ms');
for (const r of rows) {
  console.log(`${r.size.padEnd(7)} ${String(r.runs).padEnd(5)} ${`${r.sqlite.p50} / ${r.sqlite.p90}`.padEnd(19)} ${r.file.p50} / ${r.file.p90}`);
}
console.log(`RSS growth storing 20 MB: sqlite ${rssGrowth(viaSqlite, 20 * 1024 * 1024)} MB, file ${rssGrowth(viaFile, 20 * 1024 * 1024)} MB`);
sqliteDb.close();
fileDb.close();
fs.rmSync(dir, { recursive: true, force: true });
