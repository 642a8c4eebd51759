import { describe, expect, it } from 'vitest';
import { gridAxes, hasUmap, isScanned, metricInfo, parseHeadName, scannedHeads } from './config';
import type { HeadId } from './types';

const heads: HeadId[] = [[3, 4], [1, 0], [3, 0], [1, 4]];

describe('the scanned heads', () => {
  it('are ordered by layer then head', () => {
    expect(scannedHeads({ heads })).toEqual([
      { layer: 1, head: 0 }, { layer: 1, head: 4 }, { layer: 3, head: 0 }, { layer: 3, head: 4 }]);
  });
  it('are the pairs listed, not every layer with every head', () => {
    expect(isScanned({ heads }, 3, 4)).toBe(true);
    expect(isScanned({ heads: [[1, 0], [3, 4]] }, 1, 4)).toBe(false);
    expect(hasUmap({ umap_heads: [[1, 0]] }, 1, 0)).toBe(true);
    expect(hasUmap({ umap_heads: [] }, 1, 0)).toBe(false);
  });
  it('give the grid its rows and columns', () => {
    expect(gridAxes({ heads })).toEqual({ layers: [1, 3], heads: [0, 4] });
    expect(gridAxes({ heads: [] })).toEqual({ layers: [], heads: [] });
  });
});

describe('metricInfo', () => {
  it('reads the label and description, the name standing in for a missing label', () => {
    const config = { metric_labels: { bos_score: 'BOS' }, metric_descriptions: { bos_score: 'p[q, 0]' } };
    expect(metricInfo(config, 'bos_score')).toEqual({ label: 'BOS', description: 'p[q, 0]' });
    expect(metricInfo(config, 'induction_score')).toEqual({ label: 'induction_score', description: '' });
    expect(metricInfo({}, 'x')).toEqual({ label: 'x', description: '' });
  });
});

describe('parseHeadName', () => {
  it('reads the ways people write a head', () => {
    for (const text of ['L17H5', 'l17h5', ' L17 H5 ', '17.5', '17/5', '17 5', '17:5', 'L17.H5']) {
      expect(parseHeadName(text)).toEqual({ layer: 17, head: 5 });
    }
  });
  it('refuses anything else', () => {
    for (const text of ['', 'L17', 'H5', 'L17H', '17', 'x17h5', 'L-1H2', '1.5.2']) expect(parseHeadName(text)).toBeNull();
  });
});
