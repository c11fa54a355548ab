// The admin HTTP listener (plain node:http): /metrics for Prometheus, /livez and /readyz for an
// orchestrator, / for a person. It reads what the App tells it and changes nothing. With a token set,
// everything but /livez and /readyz needs it.
import { createHash, timingSafeEqual } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from '../observe/logger';
import type { Metrics } from '../observe/metrics';
import { renderStatus, type StatusView } from './status';

export interface Readiness {
  readonly ready: boolean;
  /** Why not, for a person reading the probe's output; "ready" when ready. */
  readonly reason: string;
}

export interface AdminDeps {
  readonly metrics: Metrics;
  readonly logger: Logger;
  /** The token as the running config has it (it follows reloads); undefined: no token. */
  token(): string | undefined;
  readiness(): Readiness;
  status(): Promise<StatusView>;
}

export interface AdminServer {
  readonly host: string;
  readonly port: number;
  /** Stops listening and closes open (keep-alive) connections. */
  close(): Promise<void>;
}

const digest = (text: string): Buffer => createHash('sha256').update(text, 'utf8').digest();

/**
 * The credential a request carries: `Authorization: Bearer <token>` (Prometheus, curl), or Basic auth
 * with the token as password and any user name (browsers ask for that themselves and keep sending it).
 */
function presented(header: string | undefined): string | undefined {
  const match = /^(Bearer|Basic)\s+(\S+)\s*$/i.exec(header ?? '');
  if (!match) return undefined;
  if (match[1].toLowerCase() === 'bearer') return match[2];
  const decoded = Buffer.from(match[2], 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  return colon < 0 ? undefined : decoded.slice(colon + 1);
}

function authorized(req: http.IncomingMessage, token: string | undefined): boolean {
  if (token === undefined) return true;
  const given = presented(req.headers.authorization);
  // Digests have one length, so the comparison takes the same time whatever was sent.
  return given !== undefined && timingSafeEqual(digest(given), digest(token));
}

const COMMON_HEADERS = {
  'cache-control': 'no-store',
  'x-content-type-options': 'nosniff',
  'referrer-policy': 'no-referrer',
};

export async function startAdminServer(where: { readonly host: string; readonly port: number }, deps: AdminDeps): Promise<AdminServer> {
  const send = (res: http.ServerResponse, status: number, type: string, body: string, headers: Record<string, string> = {}): void => {
    res.writeHead(status, { ...COMMON_HEADERS, 'content-type': type, 'content-length': Buffer.byteLength(body), ...headers });
    res.end(res.req.method === 'HEAD' ? undefined : body);
  };
  const text = 'text/plain; charset=utf-8';

  const handle = async (req: http.IncomingMessage, res: http.ServerResponse): Promise<void> => {
    const pathname = new URL(req.url ?? '/', 'http://admin').pathname;
    if (req.method !== 'GET' && req.method !== 'HEAD') return send(res, 405, text, 'only GET and HEAD\n', { allow: 'GET, HEAD' });
    // Probes first: they never need the token (an orchestrator's probe carries none).
    if (pathname === '/livez') return send(res, 200, text, 'ok\n');
    if (pathname === '/readyz') {
      const { ready, reason } = deps.readiness();
      return send(res, ready ? 200 : 503, text, ready ? `${reason}\n` : `not ready: ${reason}\n`);
    }
    if (pathname !== '/metrics' && pathname !== '/') return send(res, 404, text, 'not found: try /, /metrics, /livez or /readyz\n');
    if (!authorized(req, deps.token())) {
      return send(res, 401, text, 'a token is required: Authorization: Bearer <http.token>\n', {
        'www-authenticate': pathname === '/' ? 'Basic realm="SMTP Mux", charset="UTF-8"' : 'Bearer realm="SMTP Mux"',
      });
    }
    if (pathname === '/metrics') return send(res, 200, deps.metrics.contentType, await deps.metrics.exposition());
    return send(res, 200, 'text/html; charset=utf-8', renderStatus(await deps.status()), {
      // Inline CSS only; no script, no external asset, no framing.
      'content-security-policy': "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    });
  };

  const server = http.createServer((req, res) => {
    handle(req, res).catch((err: Error) => {
      deps.logger.error({ err: String(err?.stack ?? err), path: req.url?.slice(0, 200) }, 'admin HTTP request failed');
      if (!res.headersSent) send(res, 500, text, 'internal error (see the log)\n');
      else res.destroy();
    });
  });
  // A scraper that stops mid-request must not hold a socket forever.
  server.requestTimeout = 10_000;
  server.headersTimeout = 10_000;
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(where.port, where.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  server.on('error', (err) => deps.logger.error({ err: err.message }, 'admin HTTP server error'));
  const address = server.address() as AddressInfo;
  return {
    host: where.host,
    port: address.port,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
