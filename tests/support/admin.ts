// Reading SMTP Mux's admin HTTP listener the way Prometheus and a person do: plain HTTP GETs, and the
// Prometheus text format parsed just enough to find one sample.

export interface Fetched {
  readonly status: number;
  readonly headers: Headers;
  readonly text: string;
}

export async function get(port: number, path: string, headers: Record<string, string> = {}): Promise<Fetched> {
  const res = await fetch(`http://127.0.0.1:${port}${path}`, { headers, signal: AbortSignal.timeout(10_000) });
  return { status: res.status, headers: res.headers, text: await res.text() };
}

/** /metrics as text; throws unless 200. */
export async function scrape(port: number, headers: Record<string, string> = {}): Promise<string> {
  const res = await get(port, '/metrics', headers);
  if (res.status !== 200) throw new Error(`/metrics answered ${res.status}: ${res.text}`);
  return res.text;
}

/**
 * The value of the sample `name` whose labels include `labels` (undefined when there is none). Samples
 * with more labels match too, so `sample(text, 'x_count')` finds an unlabelled histogram's count.
 */
export function sample(text: string, name: string, labels: Record<string, string> = {}): number | undefined {
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!match || match[1] !== name) continue;
    const found = Object.fromEntries([...(match[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)].map((m) => [m[1], m[2]]));
    if (Object.entries(labels).every(([k, v]) => found[k] === v)) return Number(match[3]);
  }
  return undefined;
}

/** The sum of every sample of `name` whose labels include `labels`. */
export function total(text: string, name: string, labels: Record<string, string> = {}): number {
  let sum = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    const value = sample(line, name, labels);
    if (value !== undefined) sum += value;
  }
  return sum;
}
