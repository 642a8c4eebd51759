/** Numbers about metrics: a head's rank among all scanned heads, and how values are printed. */

import { format } from 'd3-format';

/** 4 significant digits, trailing zeros trimmed: 0.1235, 42.11, 1.2e-5. */
export const formatValue = format('.4~g');
export const formatPercent = format('.1f');

export interface Standing {
  rank: number; // 1 = the highest value; equal values share the best rank
  of: number; // heads compared
  percentile: number; // share of heads with a value <= this one, 0..100
}

/** Where `value` stands among `values` (which include it). */
export function standing(values: number[], value: number): Standing {
  const above = values.filter((v) => v > value).length;
  const atOrBelow = values.length - above;
  return { rank: above + 1, of: values.length, percentile: (100 * atOrBelow) / values.length };
}
