import { describe, expect, it } from 'vitest';
import { headRoute, parseRoute, routeQuery, type Route } from './url';

describe('parseRoute', () => {
  it('reads the contract deep links', () => {
    expect(parseRoute('?layer=5&head=0&tab=metrics&interval=3')).toEqual(
      headRoute(5, 0, { tab: 'metrics', interval: 3 }));
    expect(parseRoute('?layer=5&head=0&attr=qk&seq=1234&qpos=17&kpos=16')).toEqual(
      { kind: 'attribution', layer: 5, head: 0, attr: 'qk', seq: 1234, qpos: 17, kpos: 16 });
    expect(parseRoute('?layer=2&head=1&attr=ov&seq=c-0123456789ab&qpos=4&kpos=0')).toMatchObject(
      { kind: 'attribution', attr: 'ov', seq: 'c-0123456789ab' });
  });

  it('is the overview without a layer or head', () => {
    expect(parseRoute('')).toEqual({ kind: 'overview' });
    expect(parseRoute('?layer=3')).toEqual({ kind: 'overview' });
    expect(parseRoute('?x=bos&y=entropy&grid=self')).toEqual({ kind: 'overview', x: 'bos', y: 'entropy', grid: 'self' });
  });

  it('falls back to defaults for what it cannot read', () => {
    expect(parseRoute('?layer=1&head=2&tab=nope&interval=0&vector=z&color=red')).toEqual(headRoute(1, 2));
    expect(parseRoute('?layer=1&head=2&interval=-1')).toEqual(headRoute(1, 2, { interval: -1 }));
    expect(parseRoute('?layer=1&head=2&interval=-2')).toEqual(headRoute(1, 2));
    expect(parseRoute('?layer=-1&head=2')).toEqual({ kind: 'overview' });
    expect(parseRoute('?layer=1.5&head=2')).toEqual({ kind: 'overview' });
    // an attribution link missing a position is a head link
    expect(parseRoute('?layer=1&head=2&attr=qk&seq=3&qpos=4')).toEqual(headRoute(1, 2));
  });
});

describe('routeQuery', () => {
  const routes: Route[] = [
    { kind: 'overview' },
    { kind: 'overview', x: 'bos', grid: 'self' },
    headRoute(0, 0),
    headRoute(29, 8, { tab: 'projection', vector: 'o', view: 'umap', color: 'cluster' }),
    headRoute(3, 4, { tab: 'metrics', interval: 7 }),
    headRoute(3, 4, { interval: -1 }),
    { kind: 'attribution', layer: 1, head: 0, attr: 'qk', seq: 'c-abc', qpos: 3, kpos: 1 },
  ];
  it.each(routes.map((r) => [routeQuery(r), r]))('round-trips %s', (query, route) => {
    expect(parseRoute(query as string)).toEqual(route);
  });

  it('writes the contract parameters in order, defaults left out', () => {
    expect(routeQuery(headRoute(3, 4))).toBe('?layer=3&head=4&tab=sequences&interval=10');
    expect(routeQuery(headRoute(3, 4, { tab: 'projection' }))).toBe('?layer=3&head=4&tab=projection');
    expect(routeQuery({ kind: 'overview' })).toBe('');
    expect(routeQuery({ kind: 'attribution', layer: 5, head: 0, attr: 'qk', seq: 1234, qpos: 17, kpos: 16 }))
      .toBe('?layer=5&head=0&attr=qk&seq=1234&qpos=17&kpos=16');
  });
});
