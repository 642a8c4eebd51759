/** Reading a sequence's sparse attention pattern (flat COO, `idx = q * seq_len + k`, ascending).
 *
 * Entries the scan dropped (outside the row's top_k, or below min_weight) read
 * as 0: the pattern shown is the stored one, never renormalized.
 */

import type { SequenceRecord } from './types';

type Pattern = Pick<SequenceRecord, 'seq_len' | 'attention_indices' | 'attention_values'>;

/** Per key k: max over rows q >= 1 of p[q, k], with column 0 left at 0, as max_activation skips it. (seq_len,) */
export function keyMaxima(seq: Pattern): Float64Array {
  const { seq_len, attention_indices: indices, attention_values: values } = seq;
  const maxima = new Float64Array(seq_len);
  for (let i = 0; i < indices.length; i++) {
    const q = Math.floor(indices[i] / seq_len);
    const k = indices[i] - q * seq_len;
    if (q >= 1 && k >= 1 && values[i] > maxima[k]) maxima[k] = values[i];
  }
  return maxima;
}

/** The first entry whose index is >= `target` (binary search: indices ascend). */
function lowerBound(indices: number[], target: number): number {
  let lo = 0;
  let hi = indices.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (indices[mid] < target) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Row q of the pattern, p[q, :], zeros where nothing is stored. (seq_len,) */
export function rowWeights(seq: Pattern, q: number): Float64Array {
  const { seq_len, attention_indices: indices, attention_values: values } = seq;
  const row = new Float64Array(seq_len);
  const end = (q + 1) * seq_len;
  for (let i = lowerBound(indices, q * seq_len); i < indices.length && indices[i] < end; i++) {
    row[indices[i] - q * seq_len] = values[i];
  }
  return row;
}

/** The index of the largest weight (the first of equals), or -1 when every weight is 0. */
export function argmax(weights: ArrayLike<number>): number {
  let best = -1;
  for (let i = 0; i < weights.length; i++) {
    if (weights[i] > 0 && (best < 0 || weights[i] > weights[best])) best = i;
  }
  return best;
}
