import { describe, expect, it } from 'vitest';
import { headRoute, parseRoute, routeQuery, type Route } from './url';

describe('parseRoute', () => {
  it('reads the contract deep links', () => {
    expect(parseRoute('?layer=5&head=0&tab=metrics&interval=3')).toEqual(
      headRoute(5, 0, { tab: 'metrics', interval: 3 }));
    expect(parseRoute('?layer=5&head=0&tab=umap')).toEqual(headRoute(5, 0, { tab: 'umap' }));
    expect(parseRoute('?layer=5&head=0&tab=help')).toEqual(headRoute(5, 0, { tab: 'help' }));
    expect(parseRoute('?layer=5&head=0&interval=-1&reduction=pairwise_max&transpose=true')).toEqual(
      headRoute(5, 0, { interval: -1, reduction: 'pairwise_max', transpose: true }));
    expect(parseRoute('?layer=5&head=0&attr=qk&seq=1234&qpos=17&kpos=16')).toEqual(
      { kind: 'attribution', layer: 5, head: 0, attr: 'qk', seq: 1234, qpos: 17, kpos: 16 });
    expect(parseRoute('?layer=2&head=1&attr=ov&seq=c1a2b3c4d5e6f&qpos=4&kpos=0')).toMatchObject(
      { kind: 'attribution', attr: 'ov', seq: 'c1a2b3c4d5e6f' });
  });

  it('leaves the interval and the view to the data when the link does not name them', () => {
    const route = parseRoute('?layer=5&head=0');
    expect(route).toEqual(headRoute(5, 0));
    expect(route).not.toHaveProperty('interval');
    expect(route).not.toHaveProperty('view');
  });

  it('is the overview without a layer or head', () => {
    expect(parseRoute('')).toEqual({ kind: 'overview' });
    expect(parseRoute('?layer=3')).toEqual({ kind: 'overview' });
    expect(parseRoute('?x=bos_score&y=pattern_entropy&grid=self_attention_score')).toEqual(
      { kind: 'overview', x: 'bos_score', y: 'pattern_entropy', grid: 'self_attention_score' });
  });

  it('reads the sink switch, the pinned row and its cell, and the head table order', () => {
    expect(parseRoute('?layer=1&head=2&sinks=hide')).toEqual(headRoute(1, 2, { sinks: false }));
    expect(parseRoute('?layer=1&head=2&sinks=show')).toEqual(headRoute(1, 2));
    expect(parseRoute('?layer=1&head=2&seq=7&pin=12')).toEqual(headRoute(1, 2, { pin: { seq: 7, pos: 12 } }));
    expect(parseRoute('?layer=1&head=2&seq=c1a2&pin=3&cell=3,1')).toEqual(
      headRoute(1, 2, { pin: { seq: 'c1a2', pos: 3, cell: { q: 3, k: 1 } } }));
    expect(parseRoute('?layer=1&head=2&seq=7')).toEqual(headRoute(1, 2)); // no token: no pin
    expect(parseRoute('?layer=1&head=2&seq=7&pin=2&cell=2')).toEqual(headRoute(1, 2, { pin: { seq: 7, pos: 2 } }));
    expect(parseRoute('?layer=1&head=2&token=77')).toEqual(headRoute(1, 2, { token: 77 }));
    expect(parseRoute('?layer=1&head=2&token=x')).toEqual(headRoute(1, 2));
    expect(parseRoute('?sort=bos_score&order=asc')).toEqual({ kind: 'overview', sort: 'bos_score', order: 'asc' });
    expect(parseRoute('?sort=bos_score&order=up')).toEqual({ kind: 'overview', sort: 'bos_score' });
  });

  it('reads the projection extras, the vector in either case', () => {
    expect(parseRoute('?layer=1&head=2&tab=umap&vector=k&view=umap1&dims=d2,d0&color=cluster')).toEqual(
      headRoute(1, 2, { tab: 'umap', vector: 'K', view: 'umap1', dims: [2, 0], color: 'cluster' }));
    expect(parseRoute('?layer=1&head=2&tab=umap&vector=O')).toMatchObject({ vector: 'O' });
  });

  it('falls back to defaults for what it cannot read', () => {
    expect(parseRoute('?layer=1&head=2&tab=nope&interval=0&vector=z&color=red&reduction=min&transpose=yes'))
      .toEqual(headRoute(1, 2));
    expect(parseRoute('?layer=1&head=2&tab=projection')).toEqual(headRoute(1, 2)); // format 1's tab name
    expect(parseRoute('?layer=1&head=2&interval=-2')).toEqual(headRoute(1, 2));
    expect(parseRoute('?layer=1&head=2&interval=100')).toEqual(headRoute(1, 2));
    expect(parseRoute('?layer=1&head=2&dims=d1,d1')).toEqual(headRoute(1, 2));
    expect(parseRoute('?layer=1&head=2&dims=d0,d3')).toEqual(headRoute(1, 2));
    expect(parseRoute('?layer=1&head=2&view=tsne')).toEqual(headRoute(1, 2));
    expect(parseRoute('?layer=-1&head=2')).toEqual({ kind: 'overview' });
    expect(parseRoute('?layer=1.5&head=2')).toEqual({ kind: 'overview' });
    // an attribution link missing a position is a head link
    expect(parseRoute('?layer=1&head=2&attr=qk&seq=3&qpos=4')).toEqual(headRoute(1, 2));
  });
});

describe('routeQuery', () => {
  const routes: Route[] = [
    { kind: 'overview' },
    { kind: 'overview', x: 'bos_score', grid: 'self_attention_score' },
    headRoute(0, 0),
    headRoute(0, 0, { interval: 10 }),
    headRoute(3, 1, { sinks: false, pin: { seq: 4, pos: 9, cell: { q: 9, k: 2 } } }),
    headRoute(3, 1, { pin: { seq: 'c9', pos: 0 } }),
    headRoute(3, 1, { token: 1234, interval: 4 }),
    { kind: 'overview', sort: 'induction_score', order: 'asc' },
    headRoute(29, 8, { tab: 'umap', vector: 'O', view: 'umap0', dims: [1, 2], color: 'cluster' }),
    headRoute(29, 8, { tab: 'umap', view: 'pca', color: 'distance' }),
    headRoute(3, 4, { tab: 'metrics', interval: 7 }),
    headRoute(3, 4, { interval: -1, reduction: 'pairwise_max', transpose: true }),
    headRoute(3, 4, { tab: 'help' }),
    { kind: 'attribution', layer: 1, head: 0, attr: 'qk', seq: 'cabc', qpos: 3, kpos: 1 },
  ];
  it.each(routes.map((r) => [routeQuery(r), r]))('round-trips %s', (query, route) => {
    expect(parseRoute(query as string)).toEqual(route);
  });

  it('writes the contract parameters in order, defaults left out', () => {
    expect(routeQuery(headRoute(3, 4))).toBe('?layer=3&head=4&tab=sequences');
    expect(routeQuery(headRoute(3, 4, { interval: 10 }))).toBe('?layer=3&head=4&tab=sequences&interval=10');
    expect(routeQuery(headRoute(3, 4, { tab: 'umap' }))).toBe('?layer=3&head=4&tab=umap');
    expect(routeQuery(headRoute(3, 4, { interval: 2, reduction: 'pairwise_max', transpose: true })))
      .toBe('?layer=3&head=4&tab=sequences&interval=2&reduction=pairwise_max&transpose=true');
    expect(routeQuery(headRoute(3, 4, { tab: 'umap', vector: 'V', dims: [0, 2] })))
      .toBe('?layer=3&head=4&tab=umap&vector=V&dims=d0,d2');
    expect(routeQuery({ kind: 'overview' })).toBe('');
    expect(routeQuery({ kind: 'attribution', layer: 5, head: 0, attr: 'qk', seq: 1234, qpos: 17, kpos: 16 }))
      .toBe('?layer=5&head=0&attr=qk&seq=1234&qpos=17&kpos=16');
  });
});
