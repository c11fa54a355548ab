// The metrics are documentation: the README's table lists every smtpmux_ metric with its type and
// labels, and the deploy/ dashboard and alerts use only metrics that exist.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { parse } from 'yaml';
import { Metrics } from '../src/observe/metrics';

const ROOT = path.join(__dirname, '..');

async function registered(): Promise<Map<string, { type: string; labels: string[] }>> {
  const metrics = new Metrics({ defaultMetrics: true });
  const out = new Map<string, { type: string; labels: string[] }>();
  // prom-client's own metric classes: get() says name and type, labelNames the labels.
  for (const metric of metrics.registry.getMetricsAsArray() as unknown as { get(): Promise<{ name: string; type: string }>; labelNames?: string[] }[]) {
    const { name, type } = await metric.get();
    out.set(name, { type: String(type), labels: [...(metric.labelNames ?? [])] });
  }
  return out;
}

test('the README lists every smtpmux_ metric with its type and labels', async () => {
  const readme = readFileSync(path.join(ROOT, 'README.md'), 'utf8');
  const table = /<!-- metrics:begin -->([\s\S]*?)<!-- metrics:end -->/.exec(readme)?.[1] ?? '';
  const rows = table
    .split('\n')
    .map((line) => /^\| `(\w+)` \| (\w+) \|([^|]*)\| (.+) \|$/.exec(line.trim()))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => [m[1], { type: m[2], labels: [...m[3].matchAll(/`(\w+)`/g)].map((l) => l[1]) }] as const);
  const ours = [...(await registered())].filter(([name]) => name.startsWith('smtpmux_'));
  expect(Object.fromEntries(rows)).toEqual(Object.fromEntries(ours));
});

test('the Grafana dashboard and the alerting rules use only metrics that exist', async () => {
  const known = await registered();
  const exists = (name: string): boolean => known.has(name) || known.has(name.replace(/_(bucket|count|sum)$/, '')) || name === 'up';
  const dashboard = JSON.parse(readFileSync(path.join(ROOT, 'deploy', 'grafana', 'smtpmux-dashboard.json'), 'utf8'));
  const exprs: string[] = dashboard.panels.flatMap((p: { targets?: { expr: string }[] }) => (p.targets ?? []).map((t) => t.expr));
  const alerts = parse(readFileSync(path.join(ROOT, 'deploy', 'prometheus', 'alerts.yml'), 'utf8'));
  exprs.push(...alerts.groups.flatMap((g: { rules: { expr: string }[] }) => g.rules.map((r) => r.expr)));
  expect(exprs.length).toBeGreaterThan(10);
  const used = new Set(exprs.flatMap((e) => [...e.matchAll(/\b((?:smtpmux|process|nodejs)_\w+|up)\b(?=\s*[{[)]|\s*$|\s*[=!<>])/g)].map((m) => m[1])));
  expect([...used].filter((name) => !exists(name))).toEqual([]);
  // The four views are there.
  for (const needed of ['smtpmux_messages_total', 'smtpmux_delivery_attempts_total', 'smtpmux_message_duration_seconds_bucket', 'smtpmux_downstream_up']) expect(used).toContain(needed);
  const scrape = parse(readFileSync(path.join(ROOT, 'deploy', 'prometheus', 'prometheus.yml'), 'utf8'));
  expect(scrape.scrape_configs[0]).toMatchObject({ job_name: 'smtpmux', metrics_path: '/metrics', static_configs: [{ targets: ['smtpmux:9587'] }] });
});
