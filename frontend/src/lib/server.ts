/** The live server (CONTRACT section 3): found through `data/server_config.json`, called with `Server.post`.
 *
 * `{}` or no server_config.json means static-only mode (`connectServer` gives
 * null) and the page hides every server-backed control. Otherwise each call
 * POSTs `{"context": <context verbatim>, ...fields}` to `{url}/api/{name}`.
 * A failure of any kind becomes a `ServerError` whose message is shown to the
 * user: the server's own `{"error": ...}` when it sent one.
 */

import { loadServerConfig } from './data';

export const ENDPOINTS = [
  'add_custom_sequence',
  'delete_custom_sequence',
  'project_to_umap',
  'save_umap_clusters',
  'qk_attributions',
  'ov_attributions',
] as const;
export type Endpoint = (typeof ENDPOINTS)[number];

export class ServerError extends Error {
  override name = 'ServerError';
  constructor(message: string, readonly status = 0) {
    super(message);
  }
}

const LOOPBACK = new Set(['localhost', '127.0.0.1', '[::1]']);

/** Where to POST: the page's own origin when it is the advertised server under another loopback name
 * (a page opened at localhost:8765 for a server advertised as 127.0.0.1:8765 would otherwise be
 * cross-origin, which the server refuses without --allow-origin); in `npm run dev`, the page's
 * origin, whose Vite proxy forwards /api; else the advertised URL. */
export function apiBase(advertised: string, page: URL, dev = false): string {
  if (dev) return page.origin;
  let url: URL;
  try {
    url = new URL(advertised);
  } catch {
    throw new ServerError(`data/server_config.json has a bad url: ${JSON.stringify(advertised)}`);
  }
  const sameServer = url.protocol === page.protocol && url.port === page.port &&
    LOOPBACK.has(url.hostname) && LOOPBACK.has(page.hostname);
  return sameServer ? page.origin : url.origin;
}

export class Server {
  constructor(readonly base: string, readonly context: unknown) {}

  /** The reply of `/api/{name}`; throws ServerError with the message to show. */
  async post<T>(name: Endpoint, fields: Record<string, unknown>): Promise<T> {
    let response: Response;
    try {
      response = await fetch(`${this.base}/api/${name}`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ context: this.context, ...fields }),
      });
    } catch {
      throw new ServerError(`cannot reach the server at ${this.base}: is python -m headvis.serve still running?`);
    }
    let reply: unknown = null;
    try {
      reply = await response.json();
    } catch {
      // not JSON: reported below by status
    }
    const error = (reply as { error?: unknown } | null)?.error;
    if (!response.ok || typeof error === 'string') {
      const message = typeof error === 'string' ? error : `${response.status} ${response.statusText}`;
      throw new ServerError(`${name}: ${message}`, response.status);
    }
    if (reply === null) throw new ServerError(`${name}: the server's reply is not JSON`, response.status);
    return reply as T;
  }
}

/** The server named by server_config.json, or null in static-only mode. */
export async function connectServer(): Promise<Server | null> {
  const config = await loadServerConfig();
  if (!config || typeof config.url !== 'string' || !config.url) return null;
  return new Server(apiBase(config.url, new URL(location.href), import.meta.env.DEV), config.context ?? null);
}
