// Large bodies stay off the heap: past the in-memory budget they spill to disk in batches, so fifty
// concurrent 20 MB messages cost the process tens of MB, not a gigabyte; a few large ones at a time stay
// in memory (no disk round trip) and give their share of the budget back when disposed.
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { run } from './support/clients';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { BodyMemory, MessageBody } from '../src/message/body';

const MB = 1024 * 1024;

/** A DATA stream of `size` bytes in fresh 64 KB chunks, as a socket delivers them. */
function dataStream(size: number, fill: number): Readable {
  let left = size;
  return new Readable({
    read() {
      if (left <= 0) return this.push(null);
      const n = Math.min(64 * 1024, left);
      left -= n;
      const chunk = Buffer.allocUnsafe(n).fill(fill);
      if (left === 0) chunk.write('\r\n', n - 2);
      this.push(chunk);
    },
  });
}

describe('message bodies and memory', () => {
  let dir: string;
  beforeEach(() => (dir = mkdtempSync(path.join(os.tmpdir(), 'smtpmux-body-test-'))));
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  test('50 concurrent 20 MB bodies spill to disk: what they hold in memory grows by well under 100 MB', async () => {
    // In a child node with --expose-gc, collecting before each sample, so the figure is what the bodies
    // hold rather than garbage the collector has not reached yet. Runs the built module (npm test builds).
    const script = `
      const { Readable } = require('node:stream');
      const { BodyMemory, MessageBody } = require(${JSON.stringify(path.join(__dirname, '..', 'dist', 'message', 'body.js'))});
      const MB = 1024 * 1024;
      const stream = (fill) => { let left = 20 * MB; return new Readable({ read() {
        if (left <= 0) return this.push(null);
        const n = Math.min(64 * 1024, left); left -= n; this.push(Buffer.allocUnsafe(n).fill(fill));
      } }); };
      gc();
      const before = process.memoryUsage();
      let peak = before.arrayBuffers + before.heapUsed;
      const sampler = setInterval(() => { gc(); const m = process.memoryUsage(); peak = Math.max(peak, m.arrayBuffers + m.heapUsed); }, 10);
      const memory = new BodyMemory();
      Promise.all(Array.from({ length: 50 }, (_, i) => MessageBody.receive(stream(65 + (i % 26)), { maxSize: 64 * MB, tmpDir: process.argv[1], memory })))
        .then(async (bodies) => {
          clearInterval(sampler);
          const ok = bodies.every((b) => b.spilled && b.size === 20 * MB);
          const file = bodies[7].open().path;
          const bytes = require('node:fs').readFileSync(file);
          const whole = bytes.length === 20 * MB && bytes[0] === 72 && bytes[bytes.length - 1] === 72;
          await Promise.all(bodies.map((b) => b.dispose()));
          console.log(JSON.stringify({ ok, whole, growthMb: (peak - before.arrayBuffers - before.heapUsed) / MB }));
        });
    `;
    const result = await run(process.execPath, ['--expose-gc', '-e', script, dir], 120_000);
    expect(result.stderr).toBe('');
    const { ok, whole, growthMb } = JSON.parse(result.stdout) as { ok: boolean; whole: boolean; growthMb: number };
    console.log(`50 concurrent 20 MB bodies: heap + Buffers held grew by ${growthMb.toFixed(1)} MB at peak`);
    expect(ok).toBe(true);
    expect(whole).toBe(true);
    expect(growthMb).toBeLessThan(100);
    expect(readdirSync(dir)).toEqual([]);
  }, 120_000);

  test('a large body stays in memory while the budget has room, and gives its share back when disposed', async () => {
    const memory = new BodyMemory(32 * MB);
    const first = await MessageBody.receive(dataStream(5 * MB, 66), { maxSize: 64 * MB, tmpDir: dir, memory });
    expect(first.spilled).toBe(false);
    expect(memory.inUse).toBe(5 * MB);
    // Over a quarter of the budget: spills even though the budget has room.
    const big = await MessageBody.receive(dataStream(9 * MB, 67), { maxSize: 64 * MB, tmpDir: dir, memory });
    expect(big.spilled).toBe(true);
    expect(memory.inUse).toBe(5 * MB);
    // Without a budget, anything past the spill threshold spills.
    const unbudgeted = await MessageBody.receive(dataStream(2 * MB, 68), { maxSize: 64 * MB, tmpDir: dir });
    expect(unbudgeted.spilled).toBe(true);
    const opened = first.open() as Buffer;
    expect(Buffer.isBuffer(opened) && opened.length).toBe(5 * MB);
    await Promise.all([first, big, unbudgeted].map((b) => b.dispose()));
    expect(memory.inUse).toBe(0);
    expect(readdirSync(dir)).toEqual([]);
  });

  test('when the budget is full, the next large body spills', async () => {
    const memory = new BodyMemory(8 * MB);
    const held = [];
    for (let i = 0; i < 4; i++) held.push(await MessageBody.receive(dataStream(2 * MB, 66), { maxSize: 64 * MB, tmpDir: dir, memory }));
    expect(held.map((b) => b.spilled)).toEqual([false, false, false, false]);
    expect(memory.inUse).toBe(8 * MB);
    const next = await MessageBody.receive(dataStream(2 * MB, 67), { maxSize: 64 * MB, tmpDir: dir, memory });
    expect(next.spilled).toBe(true);
    expect(memory.inUse).toBe(8 * MB);
    const bytes = readFileSync((next.open() as { path: string }).path);
    expect(bytes.length).toBe(2 * MB);
    expect(bytes[0]).toBe(67);
    for (const body of [...held, next]) await body.dispose();
    expect(memory.inUse).toBe(0);
  });

  test('a body whose declared SIZE is too large for the budget spills without taking any of it', async () => {
    const memory = new BodyMemory(8 * MB);
    const body = await MessageBody.receive(dataStream(MB, 66), { maxSize: 64 * MB, tmpDir: dir, memory, declaredSize: 3 * MB });
    expect(body.spilled).toBe(true);
    expect(memory.inUse).toBe(0);
    await body.dispose();
  });

  test('a body that declared its SIZE= is held whole, also when the client sent more or less than it declared', async () => {
    const memory = new BodyMemory(32 * MB);
    for (const [declared, sent] of [
      [3 * MB, 3 * MB],
      [3 * MB, 3 * MB - 100_000],
      [2 * MB, 3 * MB],
    ]) {
      const body = await MessageBody.receive(dataStream(sent, 66), { maxSize: 64 * MB, tmpDir: dir, memory, declaredSize: declared });
      expect(body.spilled).toBe(false);
      const bytes = body.open() as Buffer;
      expect(bytes.length).toBe(sent);
      expect(bytes.subarray(0, 4).toString()).toBe('BBBB');
      expect(bytes.subarray(-2).toString()).toBe('\r\n');
      expect(memory.inUse).toBe(Math.max(declared, sent));
      await body.dispose();
      expect(memory.inUse).toBe(0);
    }
  });

  test('a receive that fails mid-spill leaves no file and gives its share back', async () => {
    const memory = new BodyMemory(32 * MB);
    let sent = 0;
    const broken = new Readable({
      read() {
        sent += 64 * 1024;
        if (sent > 3 * MB) return void this.destroy(new Error('client went away'));
        this.push(Buffer.alloc(64 * 1024, 70));
      },
    });
    await expect(MessageBody.receive(broken, { maxSize: 64 * MB, tmpDir: dir, spillThreshold: MB })).rejects.toThrow('client went away');
    const brokenInMemory = new Readable({
      read() {
        sent += 64 * 1024;
        if (sent > 6 * MB) return void this.destroy(new Error('client went away'));
        this.push(Buffer.alloc(64 * 1024, 70));
      },
    });
    await expect(MessageBody.receive(brokenInMemory, { maxSize: 64 * MB, tmpDir: dir, memory })).rejects.toThrow('client went away');
    expect(memory.inUse).toBe(0);
    expect(readdirSync(dir)).toEqual([]);
  });
});
