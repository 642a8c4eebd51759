import { describe, expect, it } from 'vitest';
import { argmax, columnWeights, entries, keyMaxima, queryMaxima, rowWeights, shade, strongest } from './attention';

// seq_len 3: row 0 = [1], row 1 = [0.6, 0.4], row 2 = [0.2, 0.7, 0.1] (the contract's example)
const seq = {
  seq_len: 3, attention_indices: [0, 3, 4, 6, 7, 8], attention_values: [1.0, 0.6, 0.4, 0.2, 0.7, 0.1],
  argmax: [2, 1] as [number, number], max_activation: 0.7,
};

describe('keyMaxima and queryMaxima', () => {
  it('take rows q >= 1 and keys k >= 1, leaving position 0 at 0', () => {
    expect([...keyMaxima(seq)]).toEqual([0, 0.7, 0.1]);
    expect([...queryMaxima(seq)]).toEqual([0, 0.4, 0.7]);
  });
  it('are all zeros for an empty pattern', () => {
    const empty = { seq_len: 2, attention_indices: [], attention_values: [] };
    expect([...keyMaxima(empty)]).toEqual([0, 0]);
    expect([...queryMaxima(empty)]).toEqual([0, 0]);
  });
});

describe('rowWeights and columnWeights', () => {
  it('read one row or column, zeros where nothing is stored', () => {
    expect([...rowWeights(seq, 0)]).toEqual([1, 0, 0]);
    expect([...rowWeights(seq, 1)]).toEqual([0.6, 0.4, 0]);
    expect([...rowWeights(seq, 2)]).toEqual([0.2, 0.7, 0.1]);
    expect([...columnWeights(seq, 0)]).toEqual([1, 0.6, 0.2]);
    expect([...columnWeights(seq, 1)]).toEqual([0, 0.4, 0.7]);
    expect([...columnWeights(seq, 2)]).toEqual([0, 0, 0.1]);
  });
  it('read a pattern with dropped entries and an odd length', () => {
    // seq_len 5, row 3 keeps k = 0 and k = 2 only
    const sparse = { seq_len: 5, attention_indices: [0, 15, 17, 24], attention_values: [1, 0.3, 0.5, 0.9] };
    expect([...rowWeights(sparse, 3)]).toEqual([0.3, 0, 0.5, 0, 0]);
    expect([...rowWeights(sparse, 2)]).toEqual([0, 0, 0, 0, 0]);
    expect([...rowWeights(sparse, 4)]).toEqual([0, 0, 0, 0, 0.9]);
    expect([...columnWeights(sparse, 4)]).toEqual([0, 0, 0, 0, 0.9]);
    expect([...columnWeights(sparse, 1)]).toEqual([0, 0, 0, 0, 0]);
  });
});

describe('argmax', () => {
  it('is the first of the largest, -1 when all are zero', () => {
    expect(argmax([0.2, 0.7, 0.7])).toBe(1);
    expect(argmax([0, 0])).toBe(-1);
    expect(argmax([])).toBe(-1);
  });
});

describe('shade', () => {
  it('at rest with max: row maxima, or with transpose column maxima, the strongest pair outlined', () => {
    expect(shade(seq, 'max', false, null)).toEqual({ weights: queryMaxima(seq), shades: queryMaxima(seq), query: 2, key: 1 });
    expect(shade(seq, 'max', true, null)).toEqual({ weights: keyMaxima(seq), shades: keyMaxima(seq), query: 2, key: 1 });
  });
  it('at rest with pairwise_max: only the query of the strongest pair, shaded by max_activation', () => {
    for (const transpose of [false, true]) {
      const { weights, query, key } = shade(seq, 'pairwise_max', transpose, null);
      expect([...weights]).toEqual([0, 0, 0.7]);
      expect([query, key]).toEqual([2, 1]);
    }
  });
  it('focused: the row of a query, or with transpose the column of a key, in every reduction', () => {
    for (const reduction of ['max', 'pairwise_max'] as const) {
      expect(shade(seq, reduction, false, 1)).toMatchObject({ weights: rowWeights(seq, 1), query: 1, key: 0 });
      expect(shade(seq, reduction, true, 1)).toMatchObject({ weights: columnWeights(seq, 1), query: 2, key: 1 });
    }
  });
  it('marks nothing when the sequence has no strongest pair', () => {
    const single = { seq_len: 1, attention_indices: [0], attention_values: [1], argmax: [-1, -1] as [number, number],
      max_activation: 0 };
    expect(shade(single, 'pairwise_max', false, null)).toMatchObject({ weights: new Float64Array(1), query: -1, key: -1 });
    expect(shade(single, 'max', false, null)).toMatchObject({ query: -1, key: -1 });
  });
});

describe('shade with sinks hidden', () => {
  it('leaves column 0 out of a row and rescales the rest to its largest', () => {
    const { weights, shades, query, key } = shade(seq, 'max', false, 1, false);
    expect([...weights]).toEqual([0, 0.4, 0]);
    expect([...shades]).toEqual([0, 1, 0]);
    expect([query, key]).toEqual([1, 1]); // the strongest key outside column 0
    expect([...shade(seq, 'max', false, 2, false).shades]).toEqual([0, 1, 0.1 / 0.7]);
  });
  it('shows nothing for the column of key 0, and rescales the resting maxima', () => {
    expect([...shade(seq, 'max', true, 0, false).weights]).toEqual([0, 0, 0]);
    expect([...shade(seq, 'max', false, null, false).shades]).toEqual([0, 0.4 / 0.7, 1]);
    expect([...shade(seq, 'max', false, 1, true).shades]).toEqual([0.6, 0.4, 0]); // shown: the stored weights
  });
});

describe('strongest and entries', () => {
  it('list the heaviest positions first, lower position on ties, zeros out', () => {
    expect(strongest([0.1, 0.5, 0, 0.5, 0.2], 3)).toEqual([1, 3, 4]);
    expect(strongest([0, 0], 3)).toEqual([]);
  });
  it('read the stored cells, column 0 left out when asked', () => {
    const all = entries(seq, true);
    expect([...all.q]).toEqual([0, 1, 1, 2, 2, 2]);
    expect([...all.k]).toEqual([0, 0, 1, 0, 1, 2]);
    expect(all.top).toBe(1);
    const rest = entries(seq, false);
    expect([...rest.k]).toEqual([1, 1, 2]);
    expect([...rest.value]).toEqual([0.4, 0.7, 0.1]);
    expect(rest.top).toBe(0.7);
  });
});
