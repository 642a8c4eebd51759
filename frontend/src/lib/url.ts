/** The page's state as a URL query (CONTRACT section 4): `parseRoute` and `routeQuery`, pure and lossless.
 *
 *   ?                                              the all-heads overview (x, y, grid: metric names)
 *   ?layer=L&head=H&tab=T&interval=N               a head (tab: sequences | metrics | umap | help;
 *                                                  interval: n_intervals .. 1, or -1 = custom sequences)
 *      &reduction=max|pairwise_max&transpose=true  how the sequences are shaded
 *   ?layer=L&head=H&attr=qk&seq=ID&qpos=P&kpos=P   one attribution (attr: qk | ov)
 *
 * Extras beyond the contract: `x`, `y`, `grid`, `sort`, `order` on the
 * overview; `vector`, `view`, `dims`, `color` on the umap tab; on a head,
 * `sinks=hide` (column 0 left out of the shading, rows, heatmaps and the
 * distance histogram) and `seq=ID&pin=P` (sequence ID's token P pinned: its
 * row, or with `transpose` its column), with `&cell=Q,K` the cell (Q, K) selected; `token=ID` marks a
 * token's occurrences on the sequences tab. Defaults are left out of the URL,
 * except `tab`, which head links always carry. An absent `interval` is the
 * highest one, an absent `view` the head's first UMAP view (PCA when it has none).
 */

import type { Reduction } from './attention';
import type { AttributionKind, Vector } from './types';

export const TABS = ['sequences', 'metrics', 'umap', 'help'] as const;
export type Tab = (typeof TABS)[number];
export const REDUCTIONS: Reduction[] = ['max', 'pairwise_max'];
export const VECTORS: Vector[] = ['Q', 'K', 'V', 'O'];
export const COLOR_BY = ['norm', 'position', 'distance', 'sequence', 'cluster'] as const;
export type ColorBy = (typeof COLOR_BY)[number];
/** Two of the three stored components (d0, d1, d2) to draw as x and y. */
export type Dims = [number, number];

export const CUSTOM_INTERVAL = -1;
export const MAX_INTERVALS = 99;

export interface OverviewRoute {
  kind: 'overview';
  x?: string;
  y?: string;
  grid?: string;
  sort?: string; // the head table's sort metric; absent: by layer and head
  order?: 'asc'; // absent: descending
}

/** A pinned token `pos` of sequence `seq` (its row, transposed its column) and optionally a selected cell. */
export interface Pin {
  seq: number | string;
  pos: number;
  cell?: { q: number; k: number };
}

export interface HeadRoute {
  kind: 'head';
  layer: number;
  head: number;
  tab: Tab;
  interval?: number; // 1..n_intervals, or -1 for custom sequences; absent: the highest
  reduction: Reduction;
  transpose: boolean;
  vector: Vector;
  view?: string; // "pca", or "umap{i}" for the head file's views[i]; absent: umap0 when there is one, else pca
  dims: Dims;
  color: ColorBy;
  sinks: boolean; // true: column 0 (the sink) shown; false (sinks=hide): left out
  pin?: Pin;
  token?: number; // a token id whose occurrences the sequences tab marks
}

export interface AttributionRoute {
  kind: 'attribution';
  layer: number;
  head: number;
  attr: AttributionKind;
  seq: number | string; // a scanned sequence's id or a custom id
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

/** "d0,d2" -> [0, 2]; two different components of d0, d1, d2, else the default [0, 1]. */
function parseDims(value: string | null): Dims {
  const match = /^d([012]),d([012])$/.exec(value ?? '');
  return match && match[1] !== match[2] ? [Number(match[1]), Number(match[2])] : [0, 1];
}

/** The view named by `view=`: "pca" or "umap{i}", else undefined (the automatic choice). */
function parseView(value: string | null): string | undefined {
  return value !== null && /^(pca|umap\d{1,3})$/.test(value) ? value : undefined;
}

/** A head route with every default filled in. */
export function headRoute(layer: number, head: number, changes: Partial<HeadRoute> = {}): HeadRoute {
  return {
    kind: 'head',
    layer,
    head,
    tab: 'sequences',
    reduction: 'max',
    transpose: false,
    vector: 'Q',
    dims: [0, 1],
    color: 'norm',
    sinks: true,
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
    for (const key of ['x', 'y', 'grid', 'sort'] as const) {
      const value = params.get(key);
      if (value) route[key] = value;
    }
    if (params.get('order') === 'asc') route.order = 'asc';
    return route;
  }
  const attr = params.get('attr');
  const seq = params.get('seq');
  const qpos = integer(params.get('qpos'));
  const kpos = integer(params.get('kpos'));
  if ((attr === 'qk' || attr === 'ov') && seq && qpos !== undefined && kpos !== undefined) {
    return { kind: 'attribution', layer, head, attr, seq: integer(seq) ?? seq, qpos, kpos };
  }
  const interval = integer(params.get('interval'), true);
  const route = headRoute(layer, head, {
    tab: oneOf(params.get('tab'), TABS, 'sequences'),
    reduction: oneOf(params.get('reduction'), REDUCTIONS, 'max'),
    transpose: params.get('transpose') === 'true',
    vector: oneOf(params.get('vector')?.toUpperCase() ?? null, VECTORS, 'Q'),
    dims: parseDims(params.get('dims')),
    color: oneOf(params.get('color'), COLOR_BY, 'norm'),
    sinks: params.get('sinks') !== 'hide',
  });
  const token = integer(params.get('token'));
  if (token !== undefined) route.token = token;
  const pos = integer(params.get('pin'));
  if (seq && pos !== undefined) {
    route.pin = { seq: integer(seq) ?? seq, pos };
    const cell = /^(\d{1,9}),(\d{1,9})$/.exec(params.get('cell') ?? '');
    if (cell) route.pin.cell = { q: Number(cell[1]), k: Number(cell[2]) };
  }
  if (interval !== undefined && (interval === CUSTOM_INTERVAL || (interval >= 1 && interval <= MAX_INTERVALS))) {
    route.interval = interval;
  }
  const view = parseView(params.get('view'));
  if (view !== undefined) route.view = view;
  return route;
}

/** The query string of a route ("?..." or "" for the overview); `parseRoute(routeQuery(r))` gives `r` back. */
export function routeQuery(route: Route): string {
  const params = new URLSearchParams();
  if (route.kind === 'overview') {
    for (const key of ['x', 'y', 'grid', 'sort'] as const) {
      if (route[key]) params.set(key, route[key]);
    }
    if (route.order === 'asc') params.set('order', 'asc');
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
    if (route.interval !== undefined) params.set('interval', String(route.interval));
    if (route.reduction !== 'max') params.set('reduction', route.reduction);
    if (route.transpose) params.set('transpose', 'true');
    if (route.vector !== 'Q') params.set('vector', route.vector);
    if (route.view !== undefined) params.set('view', route.view);
    if (route.dims[0] !== 0 || route.dims[1] !== 1) params.set('dims', route.dims.map((d) => `d${d}`).join(','));
    if (route.color !== 'norm') params.set('color', route.color);
    if (!route.sinks) params.set('sinks', 'hide');
    if (route.token !== undefined) params.set('token', String(route.token));
    if (route.pin) {
      params.set('seq', String(route.pin.seq));
      params.set('pin', String(route.pin.pos));
      if (route.pin.cell) params.set('cell', `${route.pin.cell.q},${route.pin.cell.k}`);
    }
  }
  // URLSearchParams writes "," as %2C; a comma is legal in a query and reads better in the dims list
  const query = params.toString().replaceAll('%2C', ',');
  return query ? `?${query}` : '';
}
