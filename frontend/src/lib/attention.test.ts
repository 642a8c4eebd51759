import { describe, expect, it } from 'vitest';
import { argmax, keyMaxima, rowWeights } from './attention';

// seq_len 3: row 0 = [1], row 1 = [0.6, 0.4], row 2 = [0.2, 0.7, 0.1] (the contract's example)
const seq = { seq_len: 3, attention_indices: [0, 3, 4, 6, 7, 8], attention_values: [1.0, 0.6, 0.4, 0.2, 0.7, 0.1] };

describe('keyMaxima', () => {
  it('takes rows q >= 1 and leaves column 0 at 0', () => {
    expect([...keyMaxima(seq)]).toEqual([0, 0.7, 0.1]);
  });
  it('is all zeros for an empty pattern', () => {
    expect([...keyMaxima({ seq_len: 2, attention_indices: [], attention_values: [] })]).toEqual([0, 0]);
  });
});

describe('rowWeights', () => {
  it('reads one row, zeros where nothing is stored', () => {
    expect([...rowWeights(seq, 0)]).toEqual([1, 0, 0]);
    expect([...rowWeights(seq, 1)]).toEqual([0.6, 0.4, 0]);
    expect([...rowWeights(seq, 2)]).toEqual([0.2, 0.7, 0.1]);
  });
  it('reads a row with dropped entries and an odd length', () => {
    // seq_len 5, row 3 keeps k = 0 and k = 2 only
    const sparse = { seq_len: 5, attention_indices: [0, 15, 17, 24], attention_values: [1, 0.3, 0.5, 0.9] };
    expect([...rowWeights(sparse, 3)]).toEqual([0.3, 0, 0.5, 0, 0]);
    expect([...rowWeights(sparse, 2)]).toEqual([0, 0, 0, 0, 0]);
    expect([...rowWeights(sparse, 4)]).toEqual([0, 0, 0, 0, 0.9]);
  });
});

describe('argmax', () => {
  it('is the first of the largest, -1 when all are zero', () => {
    expect(argmax([0.2, 0.7, 0.7])).toBe(1);
    expect(argmax([0, 0])).toBe(-1);
    expect(argmax([])).toBe(-1);
  });
});
