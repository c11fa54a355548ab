// The status page: one server-rendered HTML page a person reads at a glance — each user's downstreams
// with their state, the last minutes' attempts, latency and quota use as small bars, and the last
// reload. Inline CSS, no script, no external asset; it refreshes itself. It is built from a StatusView
// that holds no password, token, message body or recipient, so none can reach the page.
import { RECENT_MINUTES, type RecentSummary } from '../observe/recent';
import { roughDuration } from '../rough-duration';
import type { StateStatus } from '../state/store';

export interface DownstreamStatus {
  readonly name: string;
  readonly addr: string;
  readonly tls: string;
  readonly up: boolean;
  readonly cooldownUntil?: number;
  /** Failures in a row since its last success, and the code of the last one (never its reply text). */
  readonly failures: number;
  readonly lastErrorCode?: string;
  readonly quota?: { readonly used: number; readonly limit: number };
  readonly recent: RecentSummary;
}

export interface UserStatus {
  readonly email: string;
  readonly selector: string;
  readonly messages: { readonly delivered: number; readonly deferred: number; readonly rejected: number; readonly queued: number };
  readonly downstreams: readonly DownstreamStatus[];
}

export interface ReloadStatus {
  readonly at: number;
  readonly ok: boolean;
  readonly reason: string;
  /** What was wrong (file:key or file:line:col and a sentence), when it failed. */
  readonly problems: readonly string[];
}

export interface StatusView {
  readonly now: number;
  readonly startedAt: number;
  readonly version: string;
  readonly configFile: string;
  readonly configHash: string;
  readonly ready: { readonly ready: boolean; readonly reason: string };
  readonly lastReload?: ReloadStatus;
  /** Where cooldowns, rates and quotas live, and whether a shared backend is unreachable. */
  readonly state: StateStatus;
  readonly users: readonly UserStatus[];
  /** The durable spool, when there is one: counts and bytes only, no message. */
  readonly spool?: { readonly queued: number; readonly dead: number; readonly bytes: number; readonly maxSize: number; readonly oldestQueuedAt: number | null };
  /** Seconds between refreshes. */
  readonly refreshSeconds: number;
}

const ESCAPES: Record<string, string> = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
export const escapeHtml = (value: unknown): string => String(value).replace(/[&<>"']/g, (c) => ESCAPES[c]);

const ago = (ms: number): string => roughDuration(ms, { seconds: ' s', minutes: ' min', hours: ' h', days: ' d' }, [90, 5400, 172_800]);

const time = (at: number): string => new Date(at).toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');

/** A small horizontal bar: `parts` as [fraction, css class], the rest empty. */
function bar(parts: readonly (readonly [number, string])[], title: string): string {
  const spans = parts
    .filter(([fraction]) => fraction > 0)
    .map(([fraction, cls]) => `<span class="${cls}" style="width:${(Math.min(1, fraction) * 100).toFixed(1)}%"></span>`)
    .join('');
  return `<span class="bar" title="${escapeHtml(title)}">${spans}</span>`;
}

function downstreamRow(ds: DownstreamStatus, now: number, slowestMs: number): string {
  const { ok, failed, skipped, meanMs } = ds.recent;
  const tried = ok + failed;
  const failing = ds.failures > 0 ? `<br><small class="muted">${ds.failures} failure(s) in a row${ds.lastErrorCode ? `, last ${escapeHtml(ds.lastErrorCode)}` : ''}</small>` : '';
  const state =
    (ds.up
      ? '<span class="pill up">up</span>'
      : `<span class="pill down">cooling</span>${ds.cooldownUntil ? ` <small>for ${ago(ds.cooldownUntil - now)}</small>` : ''}`) + failing;
  const attempts =
    tried + skipped === 0
      ? '<small class="muted">no attempts</small>'
      : `${bar([[ok / Math.max(1, tried), 'ok'], [failed / Math.max(1, tried), 'fail']], `${ok} accepted, ${failed} failed`)} ${ok} ok · ${failed} failed${skipped ? ` · ${skipped} skipped` : ''}`;
  const latency =
    meanMs === undefined ? '<small class="muted">–</small>' : `${bar([[meanMs / Math.max(1, slowestMs), 'lat']], `mean ${meanMs.toFixed(0)} ms`)} ${meanMs < 10 ? meanMs.toFixed(1) : meanMs.toFixed(0)} ms`;
  const quota = ds.quota
    ? `${bar([[ds.quota.used / Math.max(1, ds.quota.limit), ds.quota.used >= ds.quota.limit ? 'fail' : 'quota']], `${ds.quota.used} of ${ds.quota.limit} used`)} ${ds.quota.used} / ${ds.quota.limit}`
    : '<small class="muted">no quota</small>';
  return `<tr><td><b>${escapeHtml(ds.name)}</b><br><small class="muted">${escapeHtml(ds.addr)} · tls ${escapeHtml(ds.tls)}</small></td><td>${state}</td><td>${attempts}</td><td>${latency}</td><td>${quota}</td></tr>`;
}

function userSection(user: UserStatus, now: number, slowestMs: number): string {
  const m = user.messages;
  return `<section>
<h2>${escapeHtml(user.email)} <small class="muted">selector ${escapeHtml(user.selector)}</small></h2>
<p class="counts"><span class="pill up">${m.delivered} delivered</span> <span class="pill warn">${m.deferred} deferred</span> <span class="pill down">${m.rejected} rejected</span>${m.queued ? ` <span class="pill warn">${m.queued} queued</span>` : ''} <small class="muted">since start</small></p>
<table><thead><tr><th>downstream</th><th>state</th><th>attempts, last ${RECENT_MINUTES} min</th><th>mean latency</th><th>quota</th></tr></thead>
<tbody>${user.downstreams.map((ds) => downstreamRow(ds, now, slowestMs)).join('')}</tbody></table>
</section>`;
}

function stateLine(view: StatusView): string {
  const st = view.state;
  if (st.backend === 'memory') return '<p>State (cooldowns, rates, quotas): in this process.</p>';
  if (!st.degraded) return '<p>State (cooldowns, rates, quotas): <span class="pill up">shared on Redis</span></p>';
  const since = st.since ? ` for ${ago(view.now - st.since)}` : '';
  return `<p>State (cooldowns, rates, quotas): <span class="pill down">Redis unreachable${since}</span> ${escapeHtml(st.reason ?? '')}; limits are per instance meanwhile (${st.localOperations} local operations).</p>`;
}

function spoolLine(view: StatusView): string {
  const sp = view.spool;
  if (!sp) return '';
  const oldest = sp.oldestQueuedAt === null ? '' : ` (oldest ${ago(view.now - sp.oldestQueuedAt)})`;
  const dead = sp.dead > 0 ? `<span class="pill down">${sp.dead} in the dead letter</span>` : '0 in the dead letter';
  return `<p>Spool: ${sp.queued > 0 ? `<span class="pill warn">${sp.queued} queued${oldest}</span>` : '0 queued'}, ${dead}; ${(sp.bytes / 2 ** 20).toFixed(1)} of ${(sp.maxSize / 2 ** 20).toFixed(0)} MB used (<code>smtpmux queue list</code>).</p>`;
}

function reloadSection(view: StatusView): string {
  const r = view.lastReload;
  if (!r) return `<p>No reload since start-up (${ago(view.now - view.startedAt)} ago).</p>`;
  const head = `Last reload ${ago(view.now - r.at)} ago (${escapeHtml(time(r.at))}, ${escapeHtml(r.reason)}): `;
  if (r.ok) return `<p>${head}<span class="pill up">ok</span></p>`;
  const problems = r.problems.slice(0, 20).map((p) => `<li><code>${escapeHtml(p)}</code></li>`).join('');
  return `<p>${head}<span class="pill down">failed</span>; the last good config keeps serving.</p><ul class="problems">${problems}</ul>`;
}

const CSS = `body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem auto;max-width:70rem;padding:0 1rem;color:#1d2330;background:#f7f8fa}
h1{font-size:1.3rem;margin:0 0 .3rem}h2{font-size:1.05rem;margin:1.4rem 0 .4rem}
section,.head{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:.6rem 1rem;margin-bottom:1rem}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.35rem .5rem;border-top:1px solid #eceff3;vertical-align:middle}
th{font-weight:600;font-size:.8rem;color:#5b6472;border-top:0}
.muted{color:#6b7280}.pill{display:inline-block;padding:0 .5rem;border-radius:1rem;font-size:.8rem;font-weight:600}
.up{background:#d8f3df;color:#135c2a}.down{background:#fbdada;color:#8a1c1c}.warn{background:#fdf0cf;color:#6b4e00}
.bar{display:inline-flex;width:7rem;height:.6rem;background:#eceff3;border-radius:3px;overflow:hidden;vertical-align:middle;margin-right:.3rem}
.bar span{display:block;height:100%}.bar .ok{background:#2f9e55}.bar .fail{background:#d64545}.bar .lat{background:#5b7bd5}.bar .quota{background:#c08a1e}
.problems code{white-space:pre-wrap}footer{color:#6b7280;font-size:.8rem}`;

export function renderStatus(view: StatusView): string {
  const slowestMs = Math.max(1, ...view.users.flatMap((u) => u.downstreams.map((d) => d.recent.meanMs ?? 0)));
  const readiness = view.ready.ready ? '<span class="pill up">ready</span>' : `<span class="pill down">not ready</span> ${escapeHtml(view.ready.reason)}`;
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="${view.refreshSeconds}">
<title>SMTP Mux status</title><style>${CSS}</style></head>
<body>
<div class="head"><h1>SMTP Mux ${escapeHtml(view.version)} ${readiness}</h1>
<p>Up ${ago(view.now - view.startedAt)} · config <code>${escapeHtml(view.configFile)}</code> (hash <code>${escapeHtml(view.configHash)}</code>) · ${view.users.length} user(s)</p>
${stateLine(view)}
${spoolLine(view)}
${reloadSection(view)}</div>
${view.users.map((u) => userSection(u, view.now, slowestMs)).join('\n')}
<footer>${escapeHtml(time(view.now))} · refreshes every ${view.refreshSeconds} s · metrics at <a href="metrics">/metrics</a></footer>
</body></html>
`;
}
