import { afterEach, describe, expect, it, vi } from 'vitest';
import { apiBase, endpointPath, parseProjectReply, Server, ServerError } from './server';

afterEach(() => vi.unstubAllGlobals());

describe('apiBase', () => {
  const page = (href: string) => new URL(href);

  it('is the advertised origin for a page from elsewhere', () => {
    expect(apiBase('http://127.0.0.1:8765', page('http://example.org/headvis/'))).toBe('http://127.0.0.1:8765');
    expect(apiBase('http://127.0.0.1:8765/', page('http://127.0.0.1:9000/'))).toBe('http://127.0.0.1:8765');
  });
  it("is the page's origin when the page comes from the same server under another loopback name", () => {
    expect(apiBase('http://127.0.0.1:8765', page('http://localhost:8765/?layer=1&head=0'))).toBe('http://localhost:8765');
    expect(apiBase('http://[::1]:8765', page('http://127.0.0.1:8765/'))).toBe('http://127.0.0.1:8765');
  });
  it("is the page's origin in development (the Vite proxy forwards /api)", () => {
    expect(apiBase('http://127.0.0.1:8765', page('http://localhost:5173/'), true)).toBe('http://localhost:5173');
  });
  it('refuses a server_url that is not one', () => {
    expect(() => apiBase('not a url', page('http://localhost:8765/'))).toThrow(ServerError);
  });
});

describe('Server.post', () => {
  function answer(status: number, body: string) {
    const fetch = vi.fn(async (_url: string, _init: RequestInit) => new Response(body, { status, statusText: 'Status' }));
    vi.stubGlobal('fetch', fetch);
    return fetch;
  }

  it("posts the fields and the context verbatim to the contract's path", async () => {
    const fetch = answer(200, '{"deleted": "cabc"}');
    const context = { setup: 'default', nested: [1, null] };
    const reply = await new Server('http://127.0.0.1:8765', context)
      .post('delete_custom_sequence', { layer: 1, head: 0, sequence_id: 'cabc' });
    expect(reply).toEqual({ deleted: 'cabc' });
    const [url, init] = fetch.mock.calls[0];
    expect(url).toBe('http://127.0.0.1:8765/api/head_vis/public/delete_custom_sequence/v0');
    expect(init.method).toBe('POST');
    expect(JSON.parse(init.body as string)).toEqual({ layer: 1, head: 0, sequence_id: 'cabc', context });
    expect(endpointPath('qk_attributions')).toBe('/api/head_vis/public/qk_attributions/v0');
  });

  it("says the server's detail, or the status when the error is not JSON", async () => {
    answer(400, '{"detail": "layer 9 was not scanned"}');
    await expect(new Server('http://h', {}).post('add_custom_sequence', {}))
      .rejects.toThrow(/^add_custom_sequence: layer 9 was not scanned$/);
    answer(502, '<html>bad gateway</html>');
    await expect(new Server('http://h', {}).post('save_umap_clusters', {}))
      .rejects.toThrow('save_umap_clusters: HTTP 502 Status');
    answer(200, 'not json');
    await expect(new Server('http://h', {}).post('save_umap_clusters', {})).rejects.toThrow("the server's reply is not JSON");
  });

  it('says the server is gone when nothing answers', async () => {
    vi.stubGlobal('fetch', vi.fn(async () => { throw new TypeError('Failed to fetch'); }));
    await expect(new Server('http://127.0.0.1:1', {}).post('project_to_umap', {}))
      .rejects.toThrow('cannot reach the server at http://127.0.0.1:1: is python -m headvis.serve still running?');
  });
});

describe('parseProjectReply', () => {
  const coords = { d0: 1, d1: 2, d2: 3 };
  const point = { seq_idx: 'c0123456789ab', top_q: 4, top_k: 2, norm: 1.5, tokens: ['<s>', 'a'],
    pca: { Q: coords, K: coords, V: coords, O: coords }, umap_views: [] };

  it('reads each of the three shapes', () => {
    expect(parseProjectReply({ found_in_cloud: true, existing_index: 0 })).toEqual({ found_in_cloud: true, existing_index: 0 });
    expect(parseProjectReply({ found_in_cloud: false, found_in_projected: true, projected_index: 3 }))
      .toEqual({ found_in_cloud: false, found_in_projected: true, projected_index: 3 });
    expect(parseProjectReply({ found_in_cloud: false, found_in_projected: false, point }))
      .toEqual({ found_in_cloud: false, found_in_projected: false, point });
  });

  it('refuses anything else, saying what came', () => {
    for (const reply of [
      null, [], {}, 'yes',
      { found_in_cloud: true }, // no index
      { found_in_cloud: true, existing_index: -1 },
      { found_in_cloud: true, existing_index: 1.5 },
      { found_in_cloud: false, found_in_projected: true, projected_index: '2' },
      { found_in_cloud: false, found_in_projected: false },
      { found_in_cloud: false, found_in_projected: false, point: { ...point, pca: undefined } },
      { found_in_cloud: false, found_in_projected: false, point: { ...point, seq_idx: null } },
      { found_in_cloud: false, point }, // found_in_projected missing
    ]) {
      expect(() => parseProjectReply(reply), JSON.stringify(reply)).toThrow(/^project_to_umap: the server's reply is none/);
    }
  });
});
