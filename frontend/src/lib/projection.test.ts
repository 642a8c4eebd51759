import { describe, expect, it } from 'vitest';
import {
  buildCloud, clusterMembers, coordinates, edgeOf, indexByEdge, locate, pendingPoint, resolveView, viewLabel, viewNames,
} from './projection';
import type { Components, Coordinate, ProjectedPoint, UmapFile, Vector } from './types';

const VECTORS: Vector[] = ['Q', 'K', 'V', 'O'];
/** Components whose values say where they come from: vector Q, component d1, point 2 -> "Q" base + 10 * 1 + 2. */
const columns = (base: number, n: number): Components =>
  ({ d0: Array.from({ length: n }, (_, i) => base + i), d1: Array.from({ length: n }, (_, i) => base + 10 + i),
    d2: Array.from({ length: n }, (_, i) => base + 20 + i) });
const perVector = (offset: number, n: number) =>
  Object.fromEntries(VECTORS.map((v, i) => [v, columns(offset + 100 * i, n)])) as Record<Vector, Components>;
const at = (value: number): Coordinate => ({ d0: value, d1: value + 1, d2: value + 2 });

function projected(seq_idx: number | string, top_q: number, top_k: number, value: number): ProjectedPoint {
  const coords = Object.fromEntries(VECTORS.map((v) => [v, at(value)])) as Record<Vector, Coordinate>;
  return { seq_idx, top_q, top_k, norm: value, pca: coords, umap_views: [coords], tokens: ['<s>', 'a', 'b'] };
}

const file: UmapFile = {
  seq_idx: [12, 12, 40],
  top_q: [3, 9, 17],
  top_k: [2, 8, 16],
  norms: [3.1, 2.7, 4.0],
  pca: perVector(0, 3),
  pca_explained_variance: { Q: [0.31, 0.12, 0.08], K: [0.3, 0.2, 0.1], V: [0.5, 0.2, 0.1], O: [0.4, 0.3, 0.2] },
  views: [{ n_neighbors: 15, min_dist: 0.1, embeddings: perVector(1000, 3) }],
  clusters: [{ name: 'digits', color: '#ff0000', points: [[12, 9, 8], [40, 17, 16], [99, 1, 1]] }],
  projected_points: [projected('c0123456789ab', 2, 1, 7)],
};

describe('buildCloud', () => {
  it('puts the projected points after the scan points, in every space, without touching the file', () => {
    const cloud = buildCloud(file, [projected(40, 5, 4, 9)]);
    expect(cloud.nScanned).toBe(3);
    expect(cloud.seq_idx).toEqual([12, 12, 40, 'c0123456789ab', 40]);
    expect(cloud.top_q).toEqual([3, 9, 17, 2, 5]);
    expect(cloud.norms).toEqual([3.1, 2.7, 4.0, 7, 9]);
    expect(cloud.tokens).toEqual([undefined, undefined, undefined, ['<s>', 'a', 'b'], ['<s>', 'a', 'b']]);
    expect(cloud.pca.K.d1).toEqual([110, 111, 112, 8, 10]);
    expect(cloud.views[0].O.d2).toEqual([1320, 1321, 1322, 9, 11]);
    expect(file.seq_idx).toHaveLength(3);
    expect(file.pca.K.d1).toHaveLength(3);
    expect(edgeOf(cloud, 3)).toEqual(['c0123456789ab', 2, 1]);
  });
  it('reads a file with PCA only and no projected points', () => {
    const pcaOnly: UmapFile = { ...file, views: undefined, projected_points: undefined, clusters: undefined };
    const cloud = buildCloud(pcaOnly);
    expect(cloud.views).toEqual([]);
    expect(cloud.seq_idx).toEqual([12, 12, 40]);
  });
  it('leaves a coordinate missing when a projected point lacks a view', () => {
    const point = { ...projected(1, 1, 1, 5), umap_views: [] };
    expect(buildCloud(file, [point]).views[0].Q.d0[4]).toBeNaN();
  });
});

describe('views and coordinates', () => {
  it('names PCA and each UMAP view, and picks the first UMAP view by default', () => {
    expect(viewNames(file)).toEqual(['pca', 'umap0']);
    expect(resolveView(file, undefined)).toBe('umap0');
    expect(resolveView(file, 'pca')).toBe('pca');
    expect(resolveView(file, 'umap3')).toBe('umap0');
    expect(resolveView({ views: undefined }, 'umap0')).toBe('pca');
    expect(viewLabel(file, 'umap0')).toBe('UMAP (n_neighbors 15, min_dist 0.1)');
    expect(viewLabel(file, 'pca')).toBe('PCA');
  });
  it('draws the two chosen components of the chosen vector', () => {
    const cloud = buildCloud(file);
    expect(coordinates(cloud, 'pca', 'Q', [0, 1])).toEqual({ xs: [0, 1, 2, 7], ys: [10, 11, 12, 8] });
    expect(coordinates(cloud, 'pca', 'V', [2, 0])).toEqual({ xs: [220, 221, 222, 9], ys: [200, 201, 202, 7] });
    expect(coordinates(cloud, 'umap0', 'K', [1, 2]).xs).toEqual([1110, 1111, 1112, 8]);
  });
});

describe('clusterMembers', () => {
  it('finds each cluster triple among the points, projected ones included, and counts the missing', () => {
    const cloud = buildCloud(file);
    const clusters = [...file.clusters!, { name: 'custom', color: '#00f', points: [['c0123456789ab', 2, 1]] as [string, number, number][] }];
    expect(clusterMembers(clusters, indexByEdge(cloud))).toEqual([
      { members: [1, 2], missing: 1 },
      { members: [3], missing: 0 },
    ]);
  });
});

describe('locate', () => {
  const cloud = buildCloud(file);
  const index = indexByEdge(cloud);
  it('places an existing point, a point projected earlier, and a new one', () => {
    expect(locate({ found_in_cloud: true, existing_index: 2 }, cloud, index)).toEqual({ index: 2, placement: 'scanned' });
    expect(locate({ found_in_cloud: false, found_in_projected: true, projected_index: 0 }, cloud, index))
      .toEqual({ index: 3, placement: 'projected earlier' });
    const point = projected(40, 5, 4, 9);
    const reply = { found_in_cloud: false, found_in_projected: false, point } as const;
    expect(locate(reply, cloud, index)).toBeNull(); // not in the cloud until added
    const withPoint = buildCloud(file, pendingPoint(reply, file));
    expect(locate(reply, withPoint, indexByEdge(withPoint))).toEqual({ index: 4, placement: 'projected now' });
  });
  it('is null for an index the file does not have', () => {
    expect(locate({ found_in_cloud: true, existing_index: 3 }, cloud, index)).toBeNull();
    expect(locate({ found_in_cloud: false, found_in_projected: true, projected_index: 1 }, cloud, index)).toBeNull();
  });
});

describe('pendingPoint', () => {
  it('adds a new point only when the file does not hold it already', () => {
    const point = projected(40, 5, 4, 9);
    expect(pendingPoint({ found_in_cloud: false, found_in_projected: false, point }, file)).toEqual([point]);
    const held = projected('c0123456789ab', 2, 1, 7);
    expect(pendingPoint({ found_in_cloud: false, found_in_projected: false, point: held }, file)).toEqual([]);
    expect(pendingPoint({ found_in_cloud: true, existing_index: 0 }, file)).toEqual([]);
    expect(pendingPoint(null, file)).toEqual([]);
  });
});
