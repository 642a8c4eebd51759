/** Reading a sequence's sparse attention pattern (flat COO, `idx = q * seq_len + k`, ascending), and how the
 * sequences tab shades its tokens (`shade`).
 *
 * Entries the scan dropped (outside the row's top_k, or below min_weight) read
 * as 0: the pattern shown is the stored one, never renormalized. The maxima
 * skip row 0 and column 0, as max_activation (and the reference frontend's
 * reductions) do.
 */

import type { SequenceRecord } from './types';

type Pattern = Pick<SequenceRecord, 'seq_len' | 'attention_indices' | 'attention_values'>;

function maxima(seq: Pattern, side: 'query' | 'key'): Float64Array {
  const { seq_len, attention_indices: indices, attention_values: values } = seq;
  const out = new Float64Array(seq_len);
  for (let i = 0; i < indices.length; i++) {
    const q = Math.floor(indices[i] / seq_len);
    const k = indices[i] - q * seq_len;
    const at = side === 'key' ? k : q;
    if (q >= 1 && k >= 1 && values[i] > out[at]) out[at] = values[i];
  }
  return out;
}

/** Per key k: max over rows q >= 1 of p[q, k], column 0 left at 0: the most attention k receives. (seq_len,) */
export const keyMaxima = (seq: Pattern) => maxima(seq, 'key');

/** Per query q: max over keys k >= 1 of p[q, k], row 0 left at 0: the most attention q gives. (seq_len,) */
export const queryMaxima = (seq: Pattern) => maxima(seq, 'query');

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

/** Column k of the pattern, p[:, k], zeros where nothing is stored. (seq_len,) */
export function columnWeights(seq: Pattern, k: number): Float64Array {
  const { seq_len, attention_indices: indices, attention_values: values } = seq;
  const column = new Float64Array(seq_len);
  for (let i = 0; i < indices.length; i++) {
    if (indices[i] % seq_len === k) column[Math.floor(indices[i] / seq_len)] = values[i];
  }
  return column;
}

/** The index of the largest weight (the first of equals), or -1 when every weight is 0. */
export function argmax(weights: ArrayLike<number>): number {
  let best = -1;
  for (let i = 0; i < weights.length; i++) {
    if (weights[i] > 0 && (best < 0 || weights[i] > weights[best])) best = i;
  }
  return best;
}

/** How tokens are shaded when no token is hovered or pinned (CONTRACT section 4's `reduction`). */
export type Reduction = 'max' | 'pairwise_max';

export interface Shading {
  weights: Float64Array; // (seq_len,) each token's stored weight (0 where left out)
  shades: Float64Array; // (seq_len,) each token's background in [0, 1]: the weight, or with sinks hidden rescaled
  query: number; // the position outlined as the query, -1 for none
  key: number; // the position outlined as the key, -1 for none
}

/** The shading of a sequence.
 *
 * At rest (`focus` null): with `max`, each token's largest weight as a query
 * (its row's maximum), or with `transpose` as a key (its column's maximum);
 * with `pairwise_max`, only the sequence's strongest pair (`argmax`), its query
 * shaded by max_activation. Either way the strongest pair is outlined.
 * Focused on a token: its row (the keys it attends to; the row's strongest key
 * outlined), or with `transpose` its column (the queries attending to it; the
 * column's strongest query outlined).
 */
export function shade(seq: Pattern & Pick<SequenceRecord, 'argmax' | 'max_activation'>, reduction: Reduction,
  transpose: boolean, focus: number | null, sinks = true): Shading {
  const stored = storedShading(seq, reduction, transpose, focus);
  if (sinks) return { ...stored, shades: stored.weights };
  // sinks hidden: column 0 leaves a row view (and a column view of key 0 is empty), and the shading is
  // rescaled to the largest weight left, so that a head that parks most of its attention on BOS still reads
  const weights = Float64Array.from(stored.weights);
  if (focus !== null && !transpose) weights[0] = 0;
  if (focus === 0 && transpose) weights.fill(0);
  const marks = focus === null ? stored : transpose ? { query: argmax(weights), key: focus } : { query: focus, key: argmax(weights) };
  return { weights, shades: rescaled(weights), query: marks.query, key: marks.key };
}

/** Weights over their largest (all zero stays zero). */
export function rescaled(weights: Float64Array): Float64Array {
  let top = 0;
  for (const w of weights) top = Math.max(top, w);
  return top > 0 ? weights.map((w) => w / top) : weights;
}

function storedShading(seq: Pattern & Pick<SequenceRecord, 'argmax' | 'max_activation'>, reduction: Reduction,
  transpose: boolean, focus: number | null): Omit<Shading, 'shades'> {
  if (focus !== null) {
    const weights = transpose ? columnWeights(seq, focus) : rowWeights(seq, focus);
    return transpose ? { weights, query: argmax(weights), key: focus } : { weights, query: focus, key: argmax(weights) };
  }
  const [q, k] = seq.argmax;
  const valid = q >= 0 && q < seq.seq_len && k >= 0 && k < seq.seq_len;
  const marks = valid ? { query: q, key: k } : { query: -1, key: -1 };
  if (reduction === 'max') return { weights: transpose ? keyMaxima(seq) : queryMaxima(seq), ...marks };
  const weights = new Float64Array(seq.seq_len);
  if (valid) weights[q] = seq.max_activation;
  return { weights, ...marks };
}

/** The `n` largest weights' positions, heaviest first (ties: the lower position), zeros left out. */
export function strongest(weights: ArrayLike<number>, n: number): number[] {
  const positions: number[] = [];
  for (let i = 0; i < weights.length; i++) if (weights[i] > 0) positions.push(i);
  return positions.sort((a, b) => weights[b] - weights[a] || a - b).slice(0, n);
}

/** The stored entries of a pattern as (q, k, value), column 0 left out unless `sinks`, and their largest value. */
export function entries(seq: Pattern, sinks: boolean): { q: Int32Array; k: Int32Array; value: Float64Array; top: number } {
  const { seq_len, attention_indices: indices, attention_values: values } = seq;
  const q = new Int32Array(indices.length);
  const k = new Int32Array(indices.length);
  const value = new Float64Array(indices.length);
  let n = 0;
  let top = 0;
  for (let i = 0; i < indices.length; i++) {
    const row = Math.floor(indices[i] / seq_len);
    const key = indices[i] - row * seq_len;
    if (!sinks && key === 0) continue;
    q[n] = row;
    k[n] = key;
    value[n] = values[i];
    top = Math.max(top, values[i]);
    n++;
  }
  return { q: q.subarray(0, n), k: k.subarray(0, n), value: value.subarray(0, n), top };
}
