/** The page's state as a URL query (CONTRACT section 4): `parseRoute` and `routeQuery`, pure and lossless.
 *
 *   ?                                          overview (x, y, grid: metric names)
 *   ?layer=L&head=H&tab=T&interval=N           a head (tab: sequences | projection | metrics)
 *   ?layer=L&head=H&attr=qk&seq=ID&qpos=P&kpos=P   one attribution
 *
 * Extras beyond the contract: `x`, `y`, `grid` on the overview; `vector`, `view`,
 * `color` on the projection tab. Defaults are left out of the URL, except `tab`
 * and, on the sequences tab, `interval`, which head links always carry.
 */

import type { AttributionKind, Vector } from './types';

export const TABS = ['sequences', 'projection', 'metrics'] as const;
export type Tab = (typeof TABS)[number];
export const VECTORS: Vector[] = ['q', 'k', 'v', 'o'];
export const COLOR_BY = ['position', 'sequence', 'cluster'] as const;
export type ColorBy = (typeof COLOR_BY)[number];

export const DEFAULT_INTERVAL = 10;
export const CUSTOM_INTERVAL = -1;

export interface OverviewRoute {
  kind: 'overview';
  x?: string;
  y?: string;
  grid?: string;
}

export interface HeadRoute {
  kind: 'head';
  layer: number;
  head: number;
  tab: Tab;
  interval: number; // 1..10, or -1 for custom sequences
  vector: Vector;
  view: string; // "pca" or a key of the projection file's views
  color: ColorBy;
}

export interface AttributionRoute {
  kind: 'attribution';
  layer: number;
  head: number;
  attr: AttributionKind;
  seq: number | string; // a scan index or a custom id
  qpos: number;
  kpos: number;
}

export type Route = OverviewRoute | HeadRoute | AttributionRoute;

/** A URL value that is a whole non-negative (or, with `signed`, any) integer, else undefined. */
function integer(value: string | null, signed = false): number | undefined {
  if (value === null || !(signed ? /^-?\d{1,9}$/ : /^\d{1,9}$/).test(value)) return undefined;
  return Number(value);
}

function oneOf<T extends string>(value: string | null, allowed: readonly T[], fallback: T): T {
  return allowed.includes(value as T) ? (value as T) : fallback;
}

/** A head route with every default filled in. */
export function headRoute(layer: number, head: number, changes: Partial<HeadRoute> = {}): HeadRoute {
  return {
    kind: 'head',
    layer,
    head,
    tab: 'sequences',
    interval: DEFAULT_INTERVAL,
    vector: 'q',
    view: 'pca',
    color: 'position',
    ...changes,
  };
}

/** The route a query string names; what it cannot read falls back to the default (the overview). */
export function parseRoute(search: string): Route {
  const params = new URLSearchParams(search);
  const layer = integer(params.get('layer'));
  const head = integer(params.get('head'));
  if (layer === undefined || head === undefined) {
    const route: OverviewRoute = { kind: 'overview' };
    for (const key of ['x', 'y', 'grid'] as const) {
      const value = params.get(key);
      if (value) route[key] = value;
    }
    return route;
  }
  const attr = params.get('attr');
  const seq = params.get('seq');
  const qpos = integer(params.get('qpos'));
  const kpos = integer(params.get('kpos'));
  if ((attr === 'qk' || attr === 'ov') && seq && qpos !== undefined && kpos !== undefined) {
    const numeric = integer(seq);
    return { kind: 'attribution', layer, head, attr, seq: numeric ?? seq, qpos, kpos };
  }
  const interval = integer(params.get('interval'), true);
  return headRoute(layer, head, {
    tab: oneOf(params.get('tab'), TABS, 'sequences'),
    interval: interval === undefined || (interval !== CUSTOM_INTERVAL && (interval < 1 || interval > 99))
      ? DEFAULT_INTERVAL : interval,
    vector: oneOf(params.get('vector'), VECTORS, 'q'),
    view: params.get('view') || 'pca',
    color: oneOf(params.get('color'), COLOR_BY, 'position'),
  });
}

/** The query string of a route ("?..." or "" for the overview); `parseRoute(routeQuery(r))` gives `r` back. */
export function routeQuery(route: Route): string {
  const params = new URLSearchParams();
  if (route.kind === 'overview') {
    for (const key of ['x', 'y', 'grid'] as const) {
      if (route[key]) params.set(key, route[key]);
    }
  } else if (route.kind === 'attribution') {
    params.set('layer', String(route.layer));
    params.set('head', String(route.head));
    params.set('attr', route.attr);
    params.set('seq', String(route.seq));
    params.set('qpos', String(route.qpos));
    params.set('kpos', String(route.kpos));
  } else {
    params.set('layer', String(route.layer));
    params.set('head', String(route.head));
    params.set('tab', route.tab);
    if (route.tab === 'sequences' || route.interval !== DEFAULT_INTERVAL) params.set('interval', String(route.interval));
    if (route.vector !== 'q') params.set('vector', route.vector);
    if (route.view !== 'pca') params.set('view', route.view);
    if (route.color !== 'position') params.set('color', route.color);
  }
  const query = params.toString();
  return query ? `?${query}` : '';
}
