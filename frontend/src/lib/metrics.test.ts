import { describe, expect, it } from 'vitest';
import { formatValue, standing } from './metrics';

describe('standing', () => {
  it('ranks from the highest, ties sharing the best rank', () => {
    expect(standing([1, 3, 3, 2], 3)).toEqual({ rank: 1, of: 4, percentile: 100 });
    expect(standing([1, 3, 3, 2], 2)).toEqual({ rank: 3, of: 4, percentile: 50 });
    expect(standing([1, 3, 3, 2], 1)).toEqual({ rank: 4, of: 4, percentile: 25 });
  });
  it('handles a single head', () => {
    expect(standing([0.5], 0.5)).toEqual({ rank: 1, of: 1, percentile: 100 });
  });
});

describe('formatValue', () => {
  it('prints 4 significant digits without trailing zeros', () => {
    expect(formatValue(0.123456)).toBe('0.1235');
    expect(formatValue(42.1088)).toBe('42.11');
    expect(formatValue(1)).toBe('1');
  });
});
