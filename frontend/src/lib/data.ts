/** Loading the data tree: every file under `./data/`, relative to the page, parsed once and cached.
 *
 * The page works from any static host that has the scanned tree next to
 * index.html as `data/` (the server serves it at `/data/`). A missing or
 * unreadable file raises `DataError` with a message meant for the page; optional
 * files (custom sequences, clusters, attributions, server_config.json) resolve
 * to null when absent. The cache keeps the last `MAX_CACHED` files: head files
 * are ~1 MB parsed each, so a long session does not keep all of them.
 */

import type {
  AttributionFile,
  AttributionKind,
  ClustersFile,
  Config,
  CustomHeadFile,
  HeadFile,
  ProjectionFile,
  ProjectionSequences,
  ScatterData,
  ServerConfig,
} from './types';

export const MAX_CACHED = 24;

/** A data file that is missing or not what the format says: `message` is shown in the page as is. */
export class DataError extends Error {
  override name = 'DataError';
}

const cache = new Map<string, Promise<unknown>>(); // insertion order = least recently used first

function hint(path: string): string {
  return path === 'config.json'
    ? ': run python -m headvis.scan first, and serve its data/ folder next to index.html'
    : ': the data tree is incomplete (re-run python -m headvis.scan)';
}

async function fetchJson(path: string, optional: boolean, reload: boolean): Promise<unknown> {
  let response: Response;
  try {
    response = await fetch(`./data/${path}`, reload ? { cache: 'no-store' } : undefined);
  } catch (e) {
    throw new DataError(`data/${path} could not be fetched (${(e as Error).message}); is the page served over HTTP?`);
  }
  const text = response.ok ? await response.text() : '';
  // Some static hosts answer a missing file with their index.html: that is "not found" too.
  const missing = response.status === 404 || (response.ok && text.trimStart().startsWith('<'));
  if (missing && optional) return null;
  if (missing) throw new DataError(`data/${path} not found${hint(path)}`);
  if (!response.ok) throw new DataError(`data/${path} could not be read (HTTP ${response.status} ${response.statusText})`);
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new DataError(`data/${path} is not valid JSON (${(e as Error).message})`);
  }
}

/** The parsed file `data/{path}` (null when `optional` and absent); cached unless `reload`. */
export function loadJson<T>(path: string, { optional = false, reload = false } = {}): Promise<T | null> {
  const key = `${optional ? '?' : ''}${path}`;
  let entry = reload ? undefined : cache.get(key);
  if (entry === undefined) {
    entry = fetchJson(path, optional, reload);
    entry.catch(() => cache.get(key) === entry && cache.delete(key)); // a failed load is retried next time
  }
  cache.delete(key);
  cache.set(key, entry);
  while (cache.size > MAX_CACHED) cache.delete(cache.keys().next().value!);
  return entry as Promise<T | null>;
}

/** Drop every cached file under `prefix` (e.g. "custom/" after the server changed the custom files). */
function forget(prefix: string): void {
  for (const key of [...cache.keys()]) {
    if (key.replace(/^\?/, '').startsWith(prefix)) cache.delete(key);
  }
}

async function required<T>(path: string, keys: string[]): Promise<T> {
  const value = (await loadJson<Record<string, unknown>>(path))!;
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new DataError(`data/${path} is not a JSON object`);
  }
  const lacking = keys.filter((k) => !(k in value));
  if (lacking.length) throw new DataError(`data/${path} is damaged: it lacks ${lacking.map((k) => `"${k}"`).join(', ')}`);
  return value as T;
}

export const headName = (layer: number, head: number) => `L${layer}H${head}`;

export const loadConfig = () =>
  required<Config>('config.json', ['model', 'dataset', 'layers', 'heads', 'metrics']);

export const loadScatter = () => required<ScatterData>('scatter_data.json', ['metrics', 'heads']);

export const loadHead = (layer: number, head: number) =>
  required<HeadFile>(`heads/${headName(layer, head)}.json`,
    ['metrics', 'interval_edges', 'interval_counts', 'qk_distance_histogram', 'top_tokens', 'sequences']);

/** custom/L{l}H{h}.json; `reload` after a change: bypasses both caches (and forgets the other heads'). */
export function loadCustom(layer: number, head: number, reload = false) {
  if (reload) forget('custom/');
  return loadJson<CustomHeadFile>(`custom/${headName(layer, head)}.json`, { optional: true, reload });
}

export const loadProjection = (layer: number, head: number) =>
  loadJson<ProjectionFile>(`umap/${headName(layer, head)}.json`, { optional: true });

export const loadProjectionSequences = () =>
  required<ProjectionSequences>('umap/sequences.json', ['sequences']);

export const loadClusters = (layer: number, head: number, reload = false) =>
  loadJson<ClustersFile>(`umap/clusters/${headName(layer, head)}.json`, { optional: true, reload });

export const attributionPath = (kind: AttributionKind, layer: number, head: number, seq: number | string,
  qpos: number, kpos: number) => `attributions/${kind}/${headName(layer, head)}S${seq}Q${qpos}K${kpos}.json`;

export const loadAttribution = (kind: AttributionKind, layer: number, head: number, seq: number | string,
  qpos: number, kpos: number) =>
  loadJson<AttributionFile>(attributionPath(kind, layer, head, seq, qpos, kpos), { optional: true });

/** server_config.json, read fresh: a server writes it when it starts and `{}` when it stops. */
export const loadServerConfig = () => loadJson<ServerConfig>('server_config.json', { optional: true, reload: true });

/** The text to show for anything thrown: our own errors' messages as they are, others with their kind. */
export function errorMessage(error: unknown): string {
  if (error instanceof Error) {
    return error.name === 'DataError' || error.name === 'ServerError' ? error.message : `${error.name}: ${error.message}`;
  }
  return String(error);
}
