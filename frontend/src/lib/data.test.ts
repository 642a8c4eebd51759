import { afterEach, describe, expect, it, vi } from 'vitest';
import { DataError, loadConfig, loadCustom, loadHead, loadJson } from './data';

/** fetch answering from `files` (path under ./data/ -> body, or a status for an error). */
function serve(files: Record<string, string | number>) {
  const fetch = vi.fn(async (url: string) => {
    const body = files[url.replace('./data/', '')];
    if (body === undefined) return new Response('not found', { status: 404, statusText: 'Not Found' });
    if (typeof body === 'number') return new Response('', { status: body, statusText: 'Error' });
    return new Response(body, { status: 200 });
  });
  vi.stubGlobal('fetch', fetch);
  return fetch;
}

afterEach(() => vi.unstubAllGlobals());

describe('loadJson', () => {
  it('parses once and serves later loads from the cache', async () => {
    const fetch = serve({ 'a1.json': '{"x": 1}' });
    expect(await loadJson('a1.json')).toEqual({ x: 1 });
    expect(await loadJson('a1.json')).toEqual({ x: 1 });
    expect(fetch).toHaveBeenCalledTimes(1);
    await loadJson('a1.json', { reload: true });
    expect(fetch).toHaveBeenCalledTimes(2);
  });

  it('gives null for a missing optional file, also when the host answers with its index.html', async () => {
    serve({ 'custom/L9H9.json': '<!doctype html><title>app</title>' });
    expect(await loadCustom(9, 9)).toBeNull();
    expect(await loadJson('nothing.json', { optional: true })).toBeNull();
  });

  it('says what is wrong with a missing, unreadable or damaged file, and retries it next time', async () => {
    serve({ 'heads/L1H2.json': '{"layer": 1', 'b.json': 500 });
    await expect(loadConfig()).rejects.toThrow(
      new DataError('data/config.json not found: run python -m headvis.scan first, and serve its data/ folder next to index.html'));
    await expect(loadHead(1, 2)).rejects.toThrow(/^data\/heads\/L1H2\.json is not valid JSON/);
    await expect(loadJson('b.json')).rejects.toThrow('data/b.json could not be read (HTTP 500 Error)');
    serve({ 'config.json': '{"model": {}, "dataset": {}, "layers": [], "heads": []}' });
    await expect(loadConfig()).rejects.toThrow('data/config.json is damaged: it lacks "metrics"');
  });
});
