// bcrypt verification on worker threads. bcryptjs is pure JS (nothing to compile, and it reads $2y$),
// but its async compare runs on the main thread in 100 ms slices, so eight logins at cost 10 stalled
// every other connection for most of a second (scripts/bench-passwords.js). Here each compare runs
// whole on one of a few workers; the event loop only passes messages.
import os from 'node:os';
import { Worker } from 'node:worker_threads';

const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const bcrypt = require(workerData.bcryptjs);
parentPort.on('message', ({ id, password, hash }) => {
  let ok = false;
  try { ok = bcrypt.compareSync(password, hash); } catch { ok = false; }
  parentPort.postMessage({ id, ok });
});
`;

interface Slot {
  worker: Worker;
  pending: Map<number, (ok: boolean) => void>;
}

const SIZE = Math.max(1, Math.min(2, os.availableParallelism() - 1));
const slots: (Slot | undefined)[] = new Array(SIZE).fill(undefined);
let nextId = 0;
let turn = 0;

function slot(index: number): Slot {
  const existing = slots[index];
  if (existing) return existing;
  const worker = new Worker(WORKER_SOURCE, { eval: true, workerData: { bcryptjs: require.resolve('bcryptjs') } });
  const created: Slot = { worker, pending: new Map() };
  worker.on('message', ({ id, ok }: { id: number; ok: boolean }) => {
    const done = created.pending.get(id);
    created.pending.delete(id);
    done?.(ok);
    if (created.pending.size === 0) worker.unref();
  });
  // A worker that dies fails its logins closed (a refusal, never an acceptance) and is replaced on next use.
  const fail = (): void => {
    if (slots[index] === created) slots[index] = undefined;
    for (const done of created.pending.values()) done(false);
    created.pending.clear();
  };
  worker.on('error', fail);
  worker.on('exit', fail);
  worker.unref();
  slots[index] = created;
  return created;
}

/** True when `password` matches the bcrypt `hash` ($2a$, $2b$ or $2y$). */
export function bcryptVerify(password: string, hash: string): Promise<boolean> {
  const target = slot(turn++ % SIZE);
  const id = nextId++;
  return new Promise((resolve) => {
    target.pending.set(id, resolve);
    target.worker.ref();
    target.worker.postMessage({ id, password, hash });
  });
}
