/** Numbers about metrics: a head's rank among all scanned heads, how values are printed, which heads have a value.
 *
 * A metric is null for a head with no counted row (CONTRACT section 2): it is
 * shown as "n/a", left out of charts and ranks, and never compared.
 */

import { format } from 'd3-format';
import type { MetricValue } from './types';

export const NOT_AVAILABLE = 'n/a';

const fourDigits = format('.4~g');

/** 4 significant digits, trailing zeros trimmed (0.1235, 42.11, 1.2e-5); "n/a" for null. */
export const formatValue = (value: MetricValue | undefined) =>
  value === null || value === undefined ? NOT_AVAILABLE : fourDigits(value);
export const formatPercent = format('.1f');

export const isValue = (value: MetricValue | undefined): value is number =>
  typeof value === 'number' && Number.isFinite(value);

export interface Standing {
  rank: number; // 1 = the highest value; equal values share the best rank
  of: number; // heads compared: those with a value
  percentile: number; // share of those heads with a value <= this one, 0..100
}

/** Where `value` stands among the non-null `values` (which include it); null when `value` itself is null. */
export function standing(values: MetricValue[], value: MetricValue): Standing | null {
  if (!isValue(value)) return null;
  const known = values.filter(isValue);
  const above = known.filter((v) => v > value).length;
  return { rank: above + 1, of: known.length, percentile: (100 * (known.length - above)) / known.length };
}

/** The rows with a value for every one of `names`, and how many were left out. */
export function withValues<Row extends Record<string, unknown>>(rows: Row[], ...names: string[]) {
  const kept = rows.filter((row) => names.every((name) => isValue(row[name] as MetricValue)));
  return { kept, leftOut: rows.length - kept.length };
}
