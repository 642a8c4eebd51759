import { describe, expect, it } from 'vitest';
import {
  cachedEdges,
  cachedMarks,
  detailOf,
  formatSumAndTotal,
  featureName,
  isCached,
  manifestKey,
  parseManifest,
  sideLabel,
  sideOrder,
  snippetPeak,
  snippetsMax,
  sortedPairs,
  targetText,
  termLabel,
  termRows,
  termsSum,
  termsTarget,
  withEdge,
} from './attributions';
import type { AttributionFile, AttributionManifest, FeaturePair } from './types';

const MANIFEST: AttributionManifest = {
  L1H0S7: { qk: [[16, 15], [9, 4]], ov: [[16, 15]] },
  L1H0Sc0123456789ab: { qk: [], ov: [[3, 2]] },
};

const pair = (q: number | null, k: number, attribution: number): FeaturePair => ({
  query_feature: q, key_feature: k, attribution, query_description: `q${q}`, key_description: `k${k}`,
  query_snippets: [], key_snippets: [{ tokens: ['a', 'b'], activations: [0, 2], interval: 10 }],
  query_activation: q === null ? null : q / 10, key_activation: k / 10,
});

function file(changes: Partial<AttributionFile> = {}): AttributionFile {
  return {
    kind: 'qk', layer: 1, head: 0, seq_idx: 7, query_pos: 16, key_pos: 15, score: 4.9, attention: 0.99,
    dictionary: { name: 'L1', hook: 'blocks.1.hook_resid_pre', d_sae: 256 },
    pairs: [pair(1, 2, 0.5), pair(3, 4, -2), pair(5, 6, 1)],
    query_marginals: [{ feature: 3, description: 'q3', snippets: [], marginal_score: -1.5,
      top_interactions: [{ feature: 4, description: 'k4', snippets: [], pairwise_score: -2 }] }],
    key_marginals: [{ feature: 9, description: 'k9', snippets: [], marginal_score: 0.25, top_interactions: [] }],
    terms: { feature_pairs: -0.5, feature_x_error: 0.4, error_x_error: 5, bias_x_bias: 0 },
    total: 4.9, pre_softcap_total: 4.9, softcap: null,
    ...changes,
  };
}

describe('the manifest', () => {
  it('keys a sequence of a head as L{layer}H{head}S{seq}', () => {
    expect(manifestKey(1, 0, 7)).toBe('L1H0S7');
    expect(manifestKey(12, 3, 'c0123456789ab')).toBe('L12H3Sc0123456789ab');
  });

  it('finds an edge only under its kind, head, sequence and (query, key) order', () => {
    expect(isCached(MANIFEST, 'qk', 1, 0, 7, 16, 15)).toBe(true);
    expect(isCached(MANIFEST, 'qk', 1, 0, 7, 15, 16)).toBe(false); // (q, k), not a set
    expect(isCached(MANIFEST, 'ov', 1, 0, 7, 9, 4)).toBe(false);
    expect(isCached(MANIFEST, 'qk', 1, 1, 7, 16, 15)).toBe(false);
    expect(isCached(MANIFEST, 'ov', 1, 0, 'c0123456789ab', 3, 2)).toBe(true);
    expect(isCached({}, 'qk', 1, 0, 7, 16, 15)).toBe(false);
    expect(cachedEdges(MANIFEST, 3, 4, 0)).toEqual({ qk: [], ov: [] });
  });

  it('adds an edge without changing the old object, once', () => {
    const before = structuredClone(MANIFEST);
    const added = withEdge(MANIFEST, 'ov', 1, 0, 7, 9, 4);
    expect(added.L1H0S7).toEqual({ qk: [[16, 15], [9, 4]], ov: [[16, 15], [9, 4]] });
    expect(MANIFEST).toEqual(before);
    expect(withEdge(added, 'ov', 1, 0, 7, 9, 4)).toBe(added);
    expect(withEdge({}, 'qk', 3, 4, 'c00', 2, 1)).toEqual({ L3H4Sc00: { qk: [[2, 1]], ov: [] } });
  });

  it('reads a file or its absence, and says what is wrong with a damaged one', () => {
    expect(parseManifest(null)).toEqual({});
    expect(parseManifest(MANIFEST)).toBe(MANIFEST);
    expect(() => parseManifest([])).toThrow('data/attributions/manifest.json is damaged: it is not a JSON object');
    expect(() => parseManifest({ L1H0: { qk: [], ov: [] } })).toThrow('"L1H0" is not L{layer}H{head}S{sequence}');
    expect(() => parseManifest({ L1H0S7: { qk: [] } })).toThrow('"L1H0S7".ov is not a list of [query_pos, key_pos]');
    expect(() => parseManifest({ L1H0S7: { qk: [[1, 2, 3]], ov: [] } })).toThrow('"L1H0S7".qk is not a list');
    expect(() => parseManifest({ L1H0S7: { qk: [[1, -2]], ov: [] } })).toThrow('"L1H0S7".qk is not a list');
  });

  it('marks the queries with a cached edge, then a pinned query\'s keys; transposed, the other way round', () => {
    const edges = { qk: [[16, 15], [9, 4]], ov: [[16, 2]] } as ReturnType<typeof cachedEdges>;
    expect(cachedMarks(edges, null, false)).toEqual(new Set([16, 9]));
    expect(cachedMarks(edges, 16, false)).toEqual(new Set([15, 2]));
    expect(cachedMarks(edges, 15, false)).toEqual(new Set());
    expect(cachedMarks(edges, null, true)).toEqual(new Set([15, 4, 2]));
    expect(cachedMarks(edges, 4, true)).toEqual(new Set([9]));
  });
});

describe('pairs and terms', () => {
  it('sorts pairs by |attribution|, largest first, ties in file order', () => {
    expect(sortedPairs(file().pairs).map((p) => p.attribution)).toEqual([-2, 1, 0.5]);
    const tied = [pair(1, 1, -1), pair(2, 2, 1), pair(3, 3, -1)];
    expect(sortedPairs(tied).map((p) => p.query_feature)).toEqual([1, 2, 3]);
    expect(sortedPairs([])).toEqual([]);
  });

  it('adds the terms up to the total, or to the total before a soft-cap', () => {
    expect(termsSum(file().terms)).toBeCloseTo(4.9, 12);
    expect(termsSum({})).toBe(0);
    expect(termsTarget(file())).toBe(4.9);
    const capped = file({ softcap: 5, pre_softcap_total: 6, total: 5 * Math.tanh(6 / 5) });
    expect(termsTarget(capped)).toBe(6);
    expect(termsTarget(file({ kind: 'ov', softcap: undefined, pre_softcap_total: undefined, total: -1.7 }))).toBe(-1.7);
  });

  it('shows the sum of the terms and the total with the digits that make them agree, up to 6', () => {
    expect(formatSumAndTotal(4.901818, 4.90182)).toEqual(['4.902', '4.902']);
    expect(formatSumAndTotal(-1.7454964, -1.7455)).toEqual(['−1.7455', '−1.7455']);
    expect(formatSumAndTotal(1.0000049, 1.0000051)).toEqual(['1', '1']); // agree at 4 digits already
    expect(formatSumAndTotal(2, 3)).toEqual(['2', '3']); // disagree at every precision: 6 digits, trimmed
  });

  it('names the terms: QK query part x key part, OV a source part', () => {
    expect(termLabel('qk', 'feature_pairs')).toBe('query features × key features');
    expect(termLabel('qk', 'error_x_b_dec')).toBe('query error × key b_dec');
    expect(termLabel('qk', 'b_dec_x_feature')).toBe('query b_dec × key features');
    expect(termLabel('ov', 'feature_pairs')).toBe('source features');
    expect(termLabel('ov', 'error')).toBe('source error');
    expect(termLabel('qk', 'something_else')).toBe('something_else');
    expect(termRows(file()).map((r) => r.name)).toEqual(['feature_pairs', 'feature_x_error', 'error_x_error', 'bias_x_bias']);
  });

  it('names the sides: QK query and key, OV source (key side) then target (query side)', () => {
    expect(sideOrder('qk')).toEqual(['query', 'key']);
    expect(sideOrder('ov')).toEqual(['key', 'query']);
    expect(sideLabel('ov', 'key')).toBe('source');
    expect(sideLabel('ov', 'query')).toBe('target');
    expect(featureName(101)).toBe('#101');
    expect(featureName(0)).toBe('#0');
    expect(featureName(null)).toBe('head output');
  });

  it("says what an OV file's target is", () => {
    expect(targetText(file())).toBeNull();
    expect(targetText(file({ kind: 'ov', target: { kind: 'head_output_direction', norm: 3.25 } })))
      .toMatch(/^the head's own output direction at the query position \(\|write\| = 3\.250\)/);
    expect(targetText(file({ kind: 'ov', target: { kind: 'dictionary', name: 'L1out', hook: 'blocks.1.hook_resid_post',
      features: [4, 5], values: [1, -1] } }))).toMatch(/^the pre-activations of 2 features of L1out at blocks\.1\.hook_resid_post/);
  });
});

describe('snippets', () => {
  it('finds the strongest token and the largest activation over snippets', () => {
    expect(snippetPeak({ tokens: ['a', 'b', 'c'], activations: [0, 3, 3] })).toBe(1);
    expect(snippetPeak({ tokens: ['a'], activations: [0] })).toBe(-1);
    expect(snippetPeak({ tokens: ['a', 'b'], activations: [-1, -0.5] })).toBe(-1);
    expect(snippetsMax([{ tokens: ['a'], activations: [2] }, { tokens: ['b', 'c'], activations: [0, 7.5] }])).toBe(7.5);
    expect(snippetsMax([])).toBe(0);
  });
});

describe('detailOf', () => {
  const f = file();
  const pairs = sortedPairs(f.pairs);

  it('shows a pair with both sides in reading order', () => {
    const detail = detailOf(f, pairs, { kind: 'pair', index: 0 })!;
    expect(detail.score).toBe(-2);
    expect(detail.scoreName).toBe('attribution');
    expect(detail.sides.map((s) => [s.side, s.feature, s.description, s.activation]))
      .toEqual([['query', 3, 'q3', 0.3], ['key', 4, 'k4', 0.4]]);
    expect(detail.sides[1].snippets).toHaveLength(1);
    const ov = detailOf({ ...f, kind: 'ov' }, pairs, { kind: 'pair', index: 0 })!;
    expect(ov.sides.map((s) => s.side)).toEqual(['key', 'query']);
  });

  it('shows a marginal feature alone, then with an interaction as the pair they make', () => {
    const alone = detailOf(f, pairs, { kind: 'marginal', side: 'query', index: 0, interaction: null })!;
    expect(alone.scoreName).toBe('marginal score');
    expect(alone.score).toBe(-1.5);
    expect(alone.sides.map((s) => [s.side, s.feature, s.activation])).toEqual([['query', 3, 0.3]]);
    expect(alone.interactions).toHaveLength(1);
    const withPartner = detailOf(f, pairs, { kind: 'marginal', side: 'query', index: 0, interaction: 0 })!;
    expect(withPartner.scoreName).toBe('pairwise score');
    expect(withPartner.score).toBe(-2);
    expect(withPartner.sides.map((s) => [s.side, s.feature, s.description])).toEqual([['query', 3, 'q3'], ['key', 4, 'k4']]);
    // a key marginal whose feature is in no listed pair: its activation is not known
    expect(detailOf(f, pairs, { kind: 'marginal', side: 'key', index: 0, interaction: null })!.sides[0].activation).toBeNull();
  });

  it('is null for nothing selected or an index the file does not have', () => {
    expect(detailOf(f, pairs, null)).toBeNull();
    expect(detailOf(f, pairs, { kind: 'pair', index: 3 })).toBeNull();
    expect(detailOf(f, pairs, { kind: 'marginal', side: 'key', index: 1, interaction: null })).toBeNull();
    expect(detailOf({ ...f, query_marginals: undefined }, pairs,
      { kind: 'marginal', side: 'query', index: 0, interaction: null })).toBeNull();
  });
});
