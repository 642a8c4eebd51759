/** The live server (CONTRACT section 3): found through `data/server_config.json`, called with `Server.post`.
 *
 * `{}` or no server_config.json means static-only mode (`connectServer` gives
 * null) and the page hides every server-backed control. Otherwise each call
 * POSTs `{...fields, "context": <context verbatim>}` to
 * `{server_url}/api/head_vis/public/{name}/v0`. A failure of any kind becomes a
 * `ServerError` whose message is shown to the user: the server's own
 * `{"detail": ...}` when it sent one. `parseProjectReply` checks the one reply
 * with several shapes.
 */

import { loadServerConfig } from './data';
import type { ProjectReply } from './types';

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

/** The path of an endpoint under the server's origin. */
export const endpointPath = (name: Endpoint) => `/api/head_vis/public/${name}/v0`;

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
    throw new ServerError(`data/server_config.json has a bad server_url: ${JSON.stringify(advertised)}`);
  }
  const sameServer = url.protocol === page.protocol && url.port === page.port &&
    LOOPBACK.has(url.hostname) && LOOPBACK.has(page.hostname);
  return sameServer ? page.origin : url.origin;
}

export class Server {
  /** attributionLayers: the layers whose attributions the server computes (server_config.json's
   * `capabilities`, headvis >= 0.4); null when the server does not say (then every layer is offered). */
  constructor(readonly base: string, readonly context: unknown, readonly attributionLayers: number[] | null = null) {}

  /** The reply of the endpoint `name`; throws ServerError with the message to show. */
  async post<T>(name: Endpoint, fields: Record<string, unknown>): Promise<T> {
    let response: Response;
    try {
      response = await fetch(`${this.base}${endpointPath(name)}`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ ...fields, context: this.context }),
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
    if (!response.ok) {
      const detail = (reply as { detail?: unknown } | null)?.detail;
      const message = typeof detail === 'string' ? detail : `HTTP ${response.status} ${response.statusText}`;
      throw new ServerError(`${name}: ${message}`, response.status);
    }
    if (reply === null) throw new ServerError(`${name}: the server's reply is not JSON`, response.status);
    return reply as T;
  }
}

/** The server named by server_config.json, or null in static-only mode. */
export async function connectServer(): Promise<Server | null> {
  const config = await loadServerConfig();
  if (!config || typeof config.server_url !== 'string' || !config.server_url) return null;
  const layers = config.capabilities?.attribution_layers;
  const attributionLayers = Array.isArray(layers) && layers.every((l) => Number.isInteger(l)) ? (layers as number[]) : null;
  return new Server(apiBase(config.server_url, new URL(location.href), import.meta.env.DEV), config.context ?? {},
    attributionLayers);
}

const isIndex = (value: unknown): value is number => Number.isInteger(value) && (value as number) >= 0;

/** The reply of `project_to_umap` as one of its three shapes, or a ServerError saying what is wrong with it. */
export function parseProjectReply(reply: unknown): ProjectReply {
  const r = (typeof reply === 'object' && reply !== null ? reply : {}) as Record<string, unknown>;
  if (r.found_in_cloud === true && isIndex(r.existing_index)) {
    return { found_in_cloud: true, existing_index: r.existing_index };
  }
  if (r.found_in_cloud === false && r.found_in_projected === true && isIndex(r.projected_index)) {
    return { found_in_cloud: false, found_in_projected: true, projected_index: r.projected_index };
  }
  const point = r.point as Record<string, unknown> | undefined;
  if (r.found_in_cloud === false && r.found_in_projected === false && typeof point === 'object' && point !== null &&
    (typeof point.seq_idx === 'number' || typeof point.seq_idx === 'string') && isIndex(point.top_q) &&
    isIndex(point.top_k) && typeof point.pca === 'object' && point.pca !== null &&
    Array.isArray(point.umap_views) && Array.isArray(point.tokens)) {
    return r as ProjectReply;
  }
  throw new ServerError(`project_to_umap: the server's reply is none of the three shapes: ${JSON.stringify(reply).slice(0, 200)}`);
}
