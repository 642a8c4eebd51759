import { describe, expect, it } from 'vitest';
import { nearest, paddedDomain } from './chart';

describe('paddedDomain', () => {
  it('widens the extent by the padding', () => {
    expect(paddedDomain([0, 10], 0.1)).toEqual([-1, 11]);
  });
  it('gives a span to a single value and a default to nothing', () => {
    expect(paddedDomain([3, 3])).toEqual([2, 4]);
    expect(paddedDomain([])).toEqual([0, 1]);
  });
});

describe('nearest', () => {
  const xs = [0, 10, 20];
  const ys = [0, 0, 5];
  it('finds the closest point within the radius', () => {
    expect(nearest(xs, ys, 9, 1, 5)).toBe(1);
    expect(nearest(xs, ys, 19, 4, 5)).toBe(2);
  });
  it('is -1 when nothing is that close', () => {
    expect(nearest(xs, ys, 50, 50, 5)).toBe(-1);
    expect(nearest([], [], 0, 0, 5)).toBe(-1);
  });
});
