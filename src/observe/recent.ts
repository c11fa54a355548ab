// The last minutes of delivery attempts per (user, downstream), for the status page: how many were
// accepted and failed, and how long they took. Fixed one-minute buckets, so recording is a few
// additions and memory is bounded by the configured downstreams.

export const RECENT_MINUTES = 15;
const MINUTE = 60_000;

interface Bucket {
  minute: number;
  ok: number;
  failed: number;
  skipped: number;
  ms: number;
}

export interface RecentSummary {
  readonly ok: number;
  readonly failed: number;
  readonly skipped: number;
  /** Mean duration of the attempts made (accepted or failed); undefined when none. */
  readonly meanMs: number | undefined;
}

export class RecentActivity {
  private readonly series = new Map<string, Bucket[]>();

  constructor(private readonly now: () => number = Date.now) {}

  record(user: string, downstream: string, result: 'ok' | 'temporary' | 'permanent' | 'skipped', ms: number): void {
    const key = `${user}\0${downstream}`;
    let buckets = this.series.get(key);
    if (!buckets) this.series.set(key, (buckets = []));
    const minute = Math.floor(this.now() / MINUTE);
    let bucket = buckets[buckets.length - 1];
    if (!bucket || bucket.minute !== minute) {
      bucket = { minute, ok: 0, failed: 0, skipped: 0, ms: 0 };
      buckets.push(bucket);
      if (buckets.length > RECENT_MINUTES) buckets.shift();
    }
    if (result === 'skipped') {
      bucket.skipped++;
      return;
    }
    if (result === 'ok') bucket.ok++;
    else bucket.failed++;
    bucket.ms += ms;
  }

  /** The last RECENT_MINUTES minutes of one user's downstream. */
  summary(user: string, downstream: string): RecentSummary {
    const since = Math.floor(this.now() / MINUTE) - RECENT_MINUTES + 1;
    let ok = 0;
    let failed = 0;
    let skipped = 0;
    let ms = 0;
    for (const b of this.series.get(`${user}\0${downstream}`) ?? []) {
      if (b.minute < since) continue;
      ok += b.ok;
      failed += b.failed;
      skipped += b.skipped;
      ms += b.ms;
    }
    return { ok, failed, skipped, meanMs: ok + failed > 0 ? ms / (ok + failed) : undefined };
  }
}
