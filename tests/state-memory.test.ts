// The in-memory StateStore's rate and quota operations, on a clock the test moves.
import { MemoryStateStore } from '../src/state/memory';

test('a rate slot costs one per message or one per recipient, and the next caller waits for all of them', async () => {
  let now = 1_000_000;
  const store = new MemoryStateStore(() => now);
  expect(await store.acquireRate('r', 2, 1000, 1000, 1)).toEqual({ ok: true, waitMs: 0 });
  expect(await store.acquireRate('r', 2, 1000, 1000, 3)).toEqual({ ok: true, waitMs: 500 });
  // 1 + 3 slots of 500 ms: the next is due 2 s after the first.
  expect(await store.acquireRate('r', 2, 1000, 1000, 1)).toEqual({ ok: false, retryInMs: 2000 });
  now += 1500;
  expect(await store.acquireRate('r', 2, 1000, 1000, 1)).toEqual({ ok: true, waitMs: 500 });
});

test('a quota reservation counts until released, and leaves the rolling window after it', async () => {
  let now = 1_000_000;
  const store = new MemoryStateStore(() => now);
  expect(await store.reserveQuota('q', 'a', 2, 3, 10_000)).toMatchObject({ ok: true, used: 2 });
  expect(await store.reserveQuota('q', 'b', 2, 3, 10_000)).toMatchObject({ ok: false, used: 2, resetsAt: 1_010_000 });
  await store.releaseQuota('q', 'a');
  expect(await store.reserveQuota('q', 'b', 2, 3, 10_000)).toMatchObject({ ok: true, used: 2 });
  now += 10_001;
  expect(await store.quotaUsage('q', 10_000)).toEqual({ used: 0, resetsAt: null });
});
