/** The shapes of the data tree's files (CONTRACT section 2, docs/data-format.md) and the server's replies.
 *
 * Names follow the JSON keys exactly; the frontend never renames a field.
 */

export interface MetricInfo {
  name: string;
  label: string;
  description: string;
}

export interface Config {
  format_version: number;
  headvis_version: string;
  created: string;
  model: {
    name: string;
    architecture: string;
    n_layers: number;
    n_heads: number;
    n_kv_heads: number;
    d_head: number;
    d_model: number;
    causal: boolean;
  };
  dataset: {
    name: string;
    split: string;
    text_column: string;
    n_sequences: number;
    seq_len: number;
    n_tokens: number;
  };
  layers: number[];
  heads: number[];
  metrics: MetricInfo[];
  intervals: number;
  sequences_per_interval: number;
  top_k: number;
  min_weight: number;
  projection?: { vectors: string[]; methods: string[]; points_per_head?: number };
  backend: string;
}

export type Metrics = Record<string, number>;

export interface ScatterHead {
  layer: number;
  head: number;
  metrics: Metrics;
}

export interface ScatterData {
  metrics: string[];
  heads: ScatterHead[];
}

/** One shown sequence of a head: its tokens and its sparse attention pattern (flat COO, idx = q * seq_len + k). */
export interface SequenceRecord {
  id: number | string; // a scan index, or "c-..." for a custom sequence
  interval: number; // 10 (highest decile) .. 1, or -1 for custom sequences
  max_activation: number;
  argmax: [number, number]; // [q, k]; [-1, -1] when no entry is positive
  tokens: string[]; // (seq_len,)
  token_ids: number[]; // (seq_len,)
  seq_len: number;
  attention_indices: number[]; // (nnz,) strictly ascending
  attention_values: number[]; // (nnz,) p[q, k]
}

export interface TopToken {
  token: string;
  id: number;
  weight: number;
  count: number;
}

export interface HeadFile {
  layer: number;
  head: number;
  metrics: Metrics;
  interval_edges: number[]; // (intervals + 1,) ascending
  interval_counts: number[]; // (intervals,)
  qk_distance_histogram: { bin_edges: number[]; weights: number[] };
  top_tokens: { query: TopToken[]; key: TopToken[] };
  top_tokens_scope?: string;
  sequences: SequenceRecord[];
}

export interface CustomHeadFile {
  layer: number;
  head: number;
  sequences: SequenceRecord[];
}

export type Vector = 'q' | 'k' | 'v' | 'o';
export type Point = [number, number];

export interface ProjectionFile {
  layer: number;
  head: number;
  points: { seq: number[]; pos: number[] }; // (n_points,) each
  pca: Record<Vector, { coords: Point[]; explained_variance_ratio: [number, number] }>;
  views?: Record<string, Record<Vector, Point[]>>;
}

export interface ProjectionSequences {
  sequences: { id: number; tokens: string[]; token_ids: number[] }[];
}

export interface Cluster {
  name: string;
  color: string; // #rgb or #rrggbb
  vector: Vector;
  view: string; // "pca" or a key of the head's views
  points: number[]; // indices into the head's points
}

export interface ClustersFile {
  clusters: Cluster[];
}

/** The reply of `project_to_umap`: the prompt's points in every vector space and view. */
export interface ProjectedPrompt {
  layer: number;
  head: number;
  tokens: string[];
  token_ids: number[];
  points: { pos: number[] };
  pca: Record<Vector, Point[]>;
  views?: Record<string, Record<Vector, Point[]>>;
  truncated: boolean;
}

/** The reply of `add_custom_sequence`: the new entry of custom/sequences.json. */
export interface CustomEntry {
  id: string;
  text: string;
  tokens: string[];
  token_ids: number[];
  created: string;
  truncated?: boolean;
}

export type AttributionKind = 'qk' | 'ov';

export interface AttributionFile {
  kind: AttributionKind;
  layer: number;
  head: number;
  seq: number | string;
  qpos: number;
  kpos: number;
  score: number;
  attention: number;
  dictionary: { name: string; hook: string; d_sae: number };
  pairs: Record<string, number>[]; // q_feature (or out_feature), k_feature, value, *_activation
  terms: Record<string, number>;
  total: number;
}

export interface ServerConfig {
  url?: string;
  context?: unknown; // forwarded verbatim, never interpreted
}
