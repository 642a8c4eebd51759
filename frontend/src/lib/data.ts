/** Loading the data tree: every file under `./data/`, relative to the page, parsed once and cached.
 *
 * The page works from any static host that has the scanned tree next to
 * index.html as `data/` (the server serves it at `/data/`). A missing or
 * unreadable file raises `DataError` with a message meant for the page; optional
 * files (custom sequences, attributions and their manifest, server_config.json) resolve to null
 * when absent; config.json must be format 2 (`loadConfig` refuses others).
 * The cache keeps the last `MAX_CACHED` files: head files are ~1 MB parsed
 * each, so a long session does not keep all of them.
 */

import {
  FORMAT_VERSION,
  type AttributionFile,
  type AttributionKind,
  type Config,
  type CustomHeadFile,
  type HeadFile,
  type ScatterData,
  type ServerConfig,
  type UmapFile,
  type UmapSequences,
} from './types';

export const MAX_CACHED = 24;

/** A data file that is missing or not what the format says: `message` is shown in the page as is. */
export class DataError extends Error {
  override name = 'DataError';
}

const cache = new Map<string, Promise<unknown>>(); // insertion order = least recently used first
const stale = new Set<string>(); // paths to fetch past the browser's cache next time (see `forget`)

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
    entry = fetchJson(path, optional, reload || stale.delete(path));
    entry.catch(() => cache.get(key) === entry && cache.delete(key)); // a failed load is retried next time
  }
  cache.delete(key);
  cache.set(key, entry);
  while (cache.size > MAX_CACHED) cache.delete(cache.keys().next().value!);
  return entry as Promise<T | null>;
}

/** Drop every cached file under `prefix` (e.g. "custom_sequences/" after the server rewrote them); their next
 * load bypasses the browser's HTTP cache too, as a static host may have told it to keep the old copy. */
export function forget(prefix: string): void {
  for (const key of [...cache.keys()]) {
    const path = key.replace(/^\?/, '');
    if (path.startsWith(prefix)) {
      cache.delete(key);
      stale.add(path);
    }
  }
}

function object(path: string, value: unknown): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new DataError(`data/${path} is not a JSON object`);
  }
  return value as Record<string, unknown>;
}

function lacking(path: string, value: Record<string, unknown>, keys: string[]): void {
  const absent = keys.filter((k) => !(k in value));
  if (absent.length) throw new DataError(`data/${path} is damaged: it lacks ${absent.map((k) => `"${k}"`).join(', ')}`);
}

async function required<T>(path: string, keys: string[]): Promise<T> {
  const value = object(path, await loadJson(path));
  lacking(path, value, keys);
  return value as T;
}

export const headName = (layer: number, head: number) => `L${layer}H${head}`;

/** config.json, refused unless it is format 2 (a format 1 tree, or one from another pipeline, says so). */
export async function loadConfig(): Promise<Config> {
  const path = 'config.json';
  const value = object(path, await loadJson(path));
  if (value.format_version !== FORMAT_VERSION) {
    const found = 'format_version' in value ? `format_version ${JSON.stringify(value.format_version)}` : 'no format_version';
    throw new DataError(`data/config.json has ${found}, and this page reads format ${FORMAT_VERSION} only: ` +
      're-scan with python -m headvis.scan to write a format 2 tree');
  }
  lacking(path, value, ['model_name', 'heads', 'n_layers', 'n_heads', 'n_intervals', 'metrics', 'has_umap', 'umap_heads']);
  return value as unknown as Config;
}

export async function loadScatter(): Promise<ScatterData> {
  const path = 'scatter_data.json';
  const value = await loadJson<unknown>(path);
  if (!Array.isArray(value)) throw new DataError(`data/${path} is not a JSON array (one row per head)`);
  return value as ScatterData;
}

export const loadHead = (layer: number, head: number) =>
  required<HeadFile>(`heads/${headName(layer, head)}.json`,
    ['sequences', 'metrics', 'interval_edges', 'interval_counts', 'qk_distance_histogram', 'top_query_tokens',
      'top_key_tokens', 'histogram', 'statistics']);

/** custom_sequences/L{l}H{h}.json (null when there is none); `reload` after a change through the server, which
 * rewrites every head's file: the other heads' cached copies are forgotten too. */
export function loadCustom(layer: number, head: number, reload = false) {
  if (reload) forget('custom_sequences/');
  return loadJson<CustomHeadFile>(`custom_sequences/${headName(layer, head)}.json`, { optional: true, reload });
}

export const umapPath = (layer: number, head: number) => `umap/${headName(layer, head)}.json`;

/** umap/L{l}H{h}.json, for a head that config.json's umap_heads lists. */
export const loadUmap = (layer: number, head: number) =>
  required<UmapFile>(umapPath(layer, head), ['seq_idx', 'top_q', 'top_k', 'norms', 'pca', 'pca_explained_variance']);

export async function loadUmapSequences(): Promise<UmapSequences> {
  const path = 'umap/sequences.json';
  return object(path, await loadJson(path)) as UmapSequences;
}

export const attributionPath = (kind: AttributionKind, layer: number, head: number, seq: number | string,
  qpos: number, kpos: number) => `attributions/${kind}/${headName(layer, head)}S${seq}Q${qpos}K${kpos}.json`;

const ATTRIBUTION_KEYS = ['kind', 'pairs', 'terms', 'total', 'score', 'attention', 'dictionary'];

/** An attribution file (or the server's reply, which is its content) as the page reads it, or a DataError
 * naming `where` and what it lacks. */
export function checkAttribution(where: string, value: unknown): AttributionFile {
  const file = object(where, value);
  lacking(where, file, ATTRIBUTION_KEYS);
  if (!Array.isArray(file.pairs)) throw new DataError(`data/${where} is damaged: "pairs" is not a list`);
  return file as unknown as AttributionFile;
}

/** attributions/{kind}/L{l}H{h}S{seq}Q{q}K{k}.json, null when absent: load it only for an edge the manifest
 * lists (`attributions/manifest.json`), so that nothing is fetched on the chance that it exists. */
export async function loadAttribution(kind: AttributionKind, layer: number, head: number, seq: number | string,
  qpos: number, kpos: number): Promise<AttributionFile | null> {
  const path = attributionPath(kind, layer, head, seq, qpos, kpos);
  const value = await loadJson<unknown>(path, { optional: true });
  return value === null ? null : checkAttribution(path, value);
}

/** attributions/manifest.json as it is (null when absent), read past the browser's cache: a server adds to it. */
export const loadManifestFile = () => loadJson<unknown>('attributions/manifest.json', { optional: true, reload: true });

/** server_config.json, read fresh: a server writes it when it starts and `{}` when it stops. */
export const loadServerConfig = () => loadJson<ServerConfig>('server_config.json', { optional: true, reload: true });

/** The text to show for anything thrown: our own errors' messages as they are, others with their kind. */
export function errorMessage(error: unknown): string {
  if (error instanceof Error) {
    return error.name === 'DataError' || error.name === 'ServerError' ? error.message : `${error.name}: ${error.message}`;
  }
  return String(error);
}
