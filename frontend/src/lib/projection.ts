/** The umap tab's point cloud: the scan's points and the server's projected ones in one list, their coordinates
 * in a chosen space (PCA or one of the UMAP views), clusters matched to points by edge, and where a
 * `project_to_umap` reply lands.
 *
 * A point is the attention edge (seq_idx, top_q, top_k). Points 0 .. nScanned-1
 * are the file's columns; the file's `projected_points` follow in order, then
 * any projected point this page holds that the file does not have yet. So
 * `existing_index` i is point i and `projected_index` i is point nScanned + i.
 */

import type { Components, Edge, ProjectedPoint, ProjectReply, UmapFile, Vector } from './types';
import type { Dims } from './url';

export interface Cloud {
  nScanned: number; // points from the file's columns; projected points follow
  seq_idx: (number | string)[]; // (n,)
  top_q: number[]; // (n,)
  top_k: number[]; // (n,)
  norms: number[]; // (n,)
  tokens: (string[] | undefined)[]; // (n,) a projected point's own tokens; scanned points read umap/sequences.json
  pca: Record<Vector, Components>; // (n,) per component
  views: Record<Vector, Components>[]; // one per UMAP view, (n,) per component
}

const VECTOR_KEYS: Vector[] = ['Q', 'K', 'V', 'O'];
const COMPONENTS = ['d0', 'd1', 'd2'] as const;

export const edgeKey = (seq_idx: number | string, top_q: number, top_k: number) => `${seq_idx},${top_q},${top_k}`;

function copy(components: Components): Components {
  return { d0: [...components.d0], d1: [...components.d1], d2: [...(components.d2 ?? [])] };
}

/** The cloud of a umap file plus `extra` projected points (never changes the file's arrays, which are cached). */
export function buildCloud(file: UmapFile, extra: ProjectedPoint[] = []): Cloud {
  const views = file.views ?? [];
  const cloud: Cloud = {
    nScanned: file.seq_idx.length,
    seq_idx: [...file.seq_idx],
    top_q: [...file.top_q],
    top_k: [...file.top_k],
    norms: [...file.norms],
    tokens: new Array(file.seq_idx.length).fill(undefined),
    pca: Object.fromEntries(VECTOR_KEYS.map((v) => [v, copy(file.pca[v])])) as Record<Vector, Components>,
    views: views.map((view) =>
      Object.fromEntries(VECTOR_KEYS.map((v) => [v, copy(view.embeddings[v])])) as Record<Vector, Components>),
  };
  for (const point of [...(file.projected_points ?? []), ...extra]) {
    cloud.seq_idx.push(point.seq_idx);
    cloud.top_q.push(point.top_q);
    cloud.top_k.push(point.top_k);
    cloud.norms.push(point.norm ?? 0);
    cloud.tokens.push(point.tokens);
    for (const v of VECTOR_KEYS) {
      for (const d of COMPONENTS) cloud.pca[v][d].push(point.pca[v][d]);
      cloud.views.forEach((view, i) => {
        for (const d of COMPONENTS) view[v][d].push(point.umap_views[i]?.[v]?.[d] ?? NaN);
      });
    }
  }
  return cloud;
}

export const cloudSize = (cloud: Cloud) => cloud.seq_idx.length;

export const edgeOf = (cloud: Cloud, i: number): Edge => [cloud.seq_idx[i], cloud.top_q[i], cloud.top_k[i]];

/** Edge key -> the point's index (the first point of an edge, should one appear twice). */
export function indexByEdge(cloud: Cloud): Map<string, number> {
  const index = new Map<string, number>();
  for (let i = cloudSize(cloud) - 1; i >= 0; i--) index.set(edgeKey(cloud.seq_idx[i], cloud.top_q[i], cloud.top_k[i]), i);
  return index;
}

/** The names of a file's spaces: "pca", then "umap0", "umap1", ... for its views. */
export function viewNames(file: Pick<UmapFile, 'views'>): string[] {
  return ['pca', ...(file.views ?? []).map((_, i) => `umap${i}`)];
}

/** The space to draw: the one asked for when the file has it, else the first UMAP view, else PCA. */
export function resolveView(file: Pick<UmapFile, 'views'>, asked: string | undefined): string {
  const names = viewNames(file);
  if (asked !== undefined && names.includes(asked)) return asked;
  return names[1] ?? 'pca';
}

export function viewLabel(file: Pick<UmapFile, 'views'>, name: string): string {
  if (name === 'pca') return 'PCA';
  const view = file.views?.[Number(name.slice('umap'.length))];
  return view ? `UMAP (n_neighbors ${view.n_neighbors}, min_dist ${view.min_dist})` : name;
}

/** The x and y of every point in `view` (a name of `viewNames`), `vector`, components `dims`. (n,) each */
export function coordinates(cloud: Cloud, view: string, vector: Vector, dims: Dims): { xs: number[]; ys: number[] } {
  const space = view === 'pca' ? cloud.pca : cloud.views[Number(view.slice('umap'.length))];
  const components = space[vector];
  return { xs: components[COMPONENTS[dims[0]]], ys: components[COMPONENTS[dims[1]]] };
}

/** Each cluster's point indices in the cloud, and how many of its edges the cloud does not have. */
export function clusterMembers(clusters: { points: Edge[] }[], index: Map<string, number>) {
  return clusters.map((cluster) => {
    const members: number[] = [];
    for (const [s, q, k] of cluster.points) {
      const i = index.get(edgeKey(s, q, k));
      if (i !== undefined) members.push(i);
    }
    return { members, missing: cluster.points.length - members.length };
  });
}

export type Placement = 'scanned' | 'projected earlier' | 'projected now';

/** Where a project_to_umap reply puts its edge in the cloud, or null when the index it names is not there. */
export function locate(reply: ProjectReply, cloud: Cloud, index: Map<string, number>):
  { index: number; placement: Placement } | null {
  if (reply.found_in_cloud) {
    return reply.existing_index < cloud.nScanned ? { index: reply.existing_index, placement: 'scanned' } : null;
  }
  if (reply.found_in_projected) {
    const i = cloud.nScanned + reply.projected_index;
    return i < cloudSize(cloud) ? { index: i, placement: 'projected earlier' } : null;
  }
  const { seq_idx, top_q, top_k } = reply.point;
  const i = index.get(edgeKey(seq_idx, top_q, top_k));
  return i === undefined ? null : { index: i, placement: 'projected now' };
}

/** The new point of a reply when the file does not hold it yet (the server appends it to projected_points,
 * but a cached or older copy of the file may lack it), to pass to `buildCloud` as `extra`. */
export function pendingPoint(reply: ProjectReply | null, file: UmapFile): ProjectedPoint[] {
  if (!reply || reply.found_in_cloud || reply.found_in_projected) return [];
  const { seq_idx, top_q, top_k } = reply.point;
  const key = edgeKey(seq_idx, top_q, top_k);
  const held = (file.projected_points ?? []).some((p) => edgeKey(p.seq_idx, p.top_q, p.top_k) === key);
  return held ? [] : [reply.point];
}
