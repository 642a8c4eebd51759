import { describe, expect, it } from 'vitest';
import { formatValue, standing, withValues } from './metrics';

describe('standing', () => {
  it('ranks from the highest, ties sharing the best rank', () => {
    expect(standing([1, 3, 3, 2], 3)).toEqual({ rank: 1, of: 4, percentile: 100 });
    expect(standing([1, 3, 3, 2], 2)).toEqual({ rank: 3, of: 4, percentile: 50 });
    expect(standing([1, 3, 3, 2], 1)).toEqual({ rank: 4, of: 4, percentile: 25 });
  });
  it('handles a single head', () => {
    expect(standing([0.5], 0.5)).toEqual({ rank: 1, of: 1, percentile: 100 });
  });
  it('ranks among the heads with a value only, and does not rank a null', () => {
    expect(standing([null, 1, null, 3, 2], 2)).toEqual({ rank: 2, of: 3, percentile: (100 * 2) / 3 });
    expect(standing([null, 1, 3], null)).toBeNull();
    expect(standing([null, null], null)).toBeNull();
  });
});

describe('formatValue', () => {
  it('prints 4 significant digits without trailing zeros', () => {
    expect(formatValue(0.123456)).toBe('0.1235');
    expect(formatValue(42.1088)).toBe('42.11');
    expect(formatValue(1)).toBe('1');
    expect(formatValue(0)).toBe('0');
  });
  it('prints n/a for a metric without a value', () => {
    expect(formatValue(null)).toBe('n/a');
    expect(formatValue(undefined)).toBe('n/a');
  });
});

describe('withValues', () => {
  it('keeps the rows with a value for every metric asked and counts the others', () => {
    const rows = [
      { layer: 0, head: 0, a: 1, b: null },
      { layer: 0, head: 1, a: 2, b: 0 },
      { layer: 1, head: 0, a: null, b: 3 },
    ];
    expect(withValues(rows, 'a', 'b')).toEqual({ kept: [rows[1]], leftOut: 2 });
    expect(withValues(rows, 'a')).toEqual({ kept: [rows[0], rows[1]], leftOut: 1 });
    expect(withValues(rows, 'missing')).toEqual({ kept: [], leftOut: 3 });
  });
});
