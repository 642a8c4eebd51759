/** The shapes of the data tree's files (format 2: CONTRACT section 2, docs/data-format.md) and the server's replies.
 *
 * Names follow the JSON keys exactly; the frontend never renames a field.
 * Fields marked "headvis addition" are written by headvis' scanner but not by
 * every pipeline that writes the reference format, so the page copes without them.
 */

/** The only data format this page reads. */
export const FORMAT_VERSION = 2;

/** A scanned head as config.json names it. */
export type HeadId = [layer: number, head: number];

/** A metric's value; null when the head has no counted row for it (e.g. no row with an induction key). */
export type MetricValue = number | null;

export interface Config {
  format_version: number;
  model_name: string;
  heads: HeadId[];
  n_layers: number;
  n_heads: number;
  n_intervals: number;
  metrics: string[]; // metric names, in display order
  metric_descriptions?: Record<string, string>;
  metric_labels?: Record<string, string>; // headvis addition
  head_data_pattern?: string;
  has_umap: boolean;
  umap_heads: HeadId[];
  statistics_display?: Record<string, { label: string; format?: string }>;
  // headvis additions
  headvis_version?: string;
  created?: string;
  model?: { architecture: string; n_kv_heads: number; d_head: number; d_model: number; causal: boolean; weights_sha256?: string };
  dataset?: { name: string; split: string; text_column: string; n_sequences: number; seq_len: number; n_tokens: number };
  layers?: number[];
  sequences_per_interval?: number;
  top_k?: number;
  min_weight?: number;
  backend?: string;
}

/** One row of scatter_data.json: a head and every metric's value. */
export type ScatterRow = { layer: number; head: number } & Record<string, MetricValue>;
export type ScatterData = ScatterRow[];

/** One shown sequence of a head: its tokens and its sparse attention pattern (flat COO, idx = q * seq_len + k). */
export interface SequenceRecord {
  sequence_id: number | string; // a scanned sequence's index, or "c" + a short hash for a custom sequence
  interval: number; // n_intervals (highest) .. 1, or -1 for custom sequences
  max_activation: number;
  argmax: [number, number]; // [q, k] of max_activation
  tokens: string[]; // (seq_len,)
  token_ids: number[]; // (seq_len,)
  seq_len: number;
  attention_indices: number[]; // (nnz,) strictly ascending
  attention_values: number[]; // (nnz,) p[q, k]
  text?: string; // custom sequences
  created?: string; // custom sequences
}

export interface TopToken {
  token: string;
  weight: number;
  id: number;
  count: number;
}

/** Bins with values: bin i is [bin_edges[i], bin_edges[i + 1]). */
export interface Binned {
  bin_edges: number[]; // (n_bins + 1,) ascending
  bin_values: number[]; // (n_bins,)
}

export interface HeadFile {
  layer: number;
  head: number;
  sequences: SequenceRecord[];
  metrics: Record<string, MetricValue>;
  interval_edges: number[]; // (n_intervals + 1,) ascending
  interval_counts: number[]; // (n_intervals,)
  qk_distance_histogram: Binned; // attention mass by q - k, sums to 1
  qk_distance_histogram_no_sink?: Binned; // the same without column 0 (headvis >= 0.4)
  top_query_tokens: TopToken[];
  top_key_tokens: TopToken[];
  histogram: Binned; // counts of every scanned sequence's max_activation, bins over [0, 1]
  statistics: { mean_max_activation: number; n_sequences: number; n_samples: number };
}

export interface CustomHeadFile {
  sequences: SequenceRecord[];
}

/** The vectors a projection point has: the query at top_q, key and value at top_k, the head's output at top_q. */
export type Vector = 'Q' | 'K' | 'V' | 'O';

/** Three components of many points, as column arrays. */
export interface Components {
  d0: number[]; // (n_points,)
  d1: number[];
  d2: number[];
}

/** Three components of one point. */
export interface Coordinate {
  d0: number;
  d1: number;
  d2: number;
}

export interface UmapView {
  n_neighbors: number;
  min_dist: number;
  embeddings: Record<Vector, Components>;
}

/** A projection point's identity: the attention edge (seq_idx, top_q, top_k). */
export type Edge = [seq_idx: number | string, top_q: number, top_k: number];

export interface Cluster {
  name: string;
  color: string; // #rgb or #rrggbb
  points: Edge[];
}

/** A point the server projected (`project_to_umap`), as it replies and as `projected_points` keeps it. */
export interface ProjectedPoint {
  seq_idx: number | string;
  top_q: number;
  top_k: number;
  norm: number;
  pca: Record<Vector, Coordinate>;
  umap_views: Record<Vector, Coordinate>[]; // one per view of the file
  tokens: string[];
}

/** umap/L{l}H{h}.json: one point per strong attention edge of the head. */
export interface UmapFile {
  seq_idx: (number | string)[]; // (n_points,)
  top_q: number[]; // (n_points,)
  top_k: number[]; // (n_points,)
  norms: number[]; // (n_points,) ||Q||
  pca: Record<Vector, Components>;
  pca_explained_variance: Record<Vector, number[]>; // (3,) per vector
  views?: UmapView[]; // only when UMAP was fitted
  clusters?: Cluster[];
  projected_points?: ProjectedPoint[];
}

/** umap/sequences.json: the tokens of every sequence a point names, keyed by its id as a string. */
export type UmapSequences = Record<string, string[]>;

/** The reply of `project_to_umap`, one of three shapes. */
export type ProjectReply =
  | { found_in_cloud: true; existing_index: number }
  | { found_in_cloud: false; found_in_projected: true; projected_index: number }
  | { found_in_cloud: false; found_in_projected: false; point: ProjectedPoint };

export type AttributionKind = 'qk' | 'ov';

/** A window of the feature library's corpus around a strong activation of a feature. */
export interface Snippet {
  tokens: string[]; // (window,)
  activations: number[]; // (window,) the feature's activation at each token
  interval?: number; // the library's activation interval of the window's centre (its n_intervals = the strongest)
  sequence_id?: number; // headvis addition: where the window comes from
  start?: number;
  position?: number;
}

/** A dictionary feature's index; null for OV's head-output-direction target (no dictionary on that side). */
export type Feature = number | null;

/** One (query part, key part) contribution. OV: `key_*` is the source (value side), `query_*` the target. */
export interface FeaturePair {
  query_feature: Feature;
  key_feature: Feature;
  attribution: number;
  query_description?: string;
  key_description?: string;
  query_snippets?: Snippet[];
  key_snippets?: Snippet[];
  query_activation: number | null;
  key_activation: number | null;
}

export interface Interaction {
  feature: Feature;
  description?: string;
  snippets?: Snippet[];
  pairwise_score: number;
}

/** A feature of one side by its row (query side) or column (key side) sum over every part of the other side. */
export interface Marginal {
  feature: Feature;
  description?: string;
  snippets?: Snippet[];
  marginal_score: number;
  top_interactions?: Interaction[];
}

/** OV: what the head's write was projected onto. */
export type AttributionTarget =
  | { kind: 'dictionary'; name: string; hook: string; features: number[]; values: number[] }
  | { kind: 'head_output_direction'; norm: number };

/** data/attributions/{qk,ov}/L{l}H{h}S{seq}Q{q}K{k}.json (headvis/schemas/attribution_file.schema.json). */
export interface AttributionFile {
  kind: AttributionKind;
  layer: number;
  head: number;
  seq_idx: number | string;
  query_pos: number;
  key_pos: number;
  score: number;
  attention: number;
  dictionary: { name: string; hook: string; d_sae: number };
  pairs: FeaturePair[]; // the largest by |attribution|; the rest are in terms.feature_pairs
  query_marginals?: Marginal[];
  key_marginals?: Marginal[];
  terms: Record<string, number>; // sums of contributions by kind of part; they add up to total (before a soft-cap)
  total: number;
  // headvis additions
  pre_softcap_total?: number; // QK
  softcap?: number | null; // QK: the model's attention logit soft-cap
  parts?: { query: { active_features: number }; key: { active_features: number } }; // QK
  target?: AttributionTarget; // OV
  feature_libraries?: Record<string, string | null>;
  note?: string; // some features have no descriptions or snippets yet, and how to compute them
}

/** data/attributions/manifest.json: "L{l}H{h}S{seq}" -> the (query_pos, key_pos) edges with a file, per kind. */
export type AttributionManifest = Record<string, Record<AttributionKind, [query_pos: number, key_pos: number][]>>;

export interface ServerConfig {
  server_url?: string;
  context?: unknown; // forwarded verbatim, never interpreted
  capabilities?: { attribution_layers?: unknown[] }; // headvis >= 0.4: what the server can do
}
