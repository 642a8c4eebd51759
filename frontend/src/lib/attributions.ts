/** Reading attribution files and the manifest (CONTRACT section 2 `attributions/`): pure helpers, no fetching.
 *
 * A QK file decomposes the edge's pre-softmax score into (query part, key
 * part) contributions; an OV file decomposes the key position's write through
 * the head into (target, source) contributions, `query_*` the target (output
 * side) and `key_*` the source (value side). Either way `terms` are sums by
 * kind of part (`feature_pairs` = every feature x feature pair, listed or
 * not) and they add up to `total` (QK with a soft-cap: to `pre_softcap_total`,
 * and `total = softcap * tanh(pre_softcap_total / softcap)`).
 *
 * The manifest, `{"L{l}H{h}S{seq}": {"qk": [[q, k]], "ov": [[q, k]]}}`, says
 * which files exist, so the page never probes for one blindly.
 */

import { format } from 'd3-format';
import { DataError } from './data';
import type {
  AttributionFile,
  AttributionKind,
  AttributionManifest,
  Feature,
  FeaturePair,
  Interaction,
  Snippet,
} from './types';

export const ATTRIBUTION_KINDS: AttributionKind[] = ['qk', 'ov'];
export const MANIFEST_PATH = 'attributions/manifest.json';

export type Side = 'query' | 'key';
/** The cached edges of one sequence of one head, per kind: [query_pos, key_pos] pairs. */
export type CachedEdges = Record<AttributionKind, [number, number][]>;

export const NO_EDGES: CachedEdges = Object.freeze({ qk: [], ov: [] }) as CachedEdges;

export const manifestKey = (layer: number, head: number, seq: number | string) => `L${layer}H${head}S${seq}`;

const isPosition = (value: unknown): value is number => Number.isInteger(value) && (value as number) >= 0;

/** The manifest as the file holds it, or a DataError saying what is wrong; null (no file) is the empty manifest. */
export function parseManifest(value: unknown): AttributionManifest {
  if (value === null) return {};
  const damaged = (why: string) => new DataError(`data/${MANIFEST_PATH} is damaged: ${why}`);
  if (typeof value !== 'object' || Array.isArray(value)) throw damaged('it is not a JSON object');
  for (const [key, entry] of Object.entries(value as Record<string, unknown>)) {
    if (!/^L\d+H\d+S(\d+|c[0-9a-f]+)$/.test(key)) throw damaged(`"${key}" is not L{layer}H{head}S{sequence}`);
    const lists = entry as Record<string, unknown> | null;
    for (const kind of ATTRIBUTION_KINDS) {
      const edges = lists?.[kind];
      if (!Array.isArray(edges) || !edges.every((e) => Array.isArray(e) && e.length === 2 && e.every(isPosition))) {
        throw damaged(`"${key}".${kind} is not a list of [query_pos, key_pos]`);
      }
    }
  }
  return value as AttributionManifest;
}

/** The edges that have a file, per kind, for one sequence of one head. */
export function cachedEdges(manifest: AttributionManifest, layer: number, head: number, seq: number | string): CachedEdges {
  return manifest[manifestKey(layer, head, seq)] ?? NO_EDGES;
}

export function isCached(manifest: AttributionManifest, kind: AttributionKind, layer: number, head: number,
  seq: number | string, query_pos: number, key_pos: number): boolean {
  return cachedEdges(manifest, layer, head, seq)[kind].some(([q, k]) => q === query_pos && k === key_pos);
}

/** The manifest with one more edge (a new object; the same one when the edge is listed already). */
export function withEdge(manifest: AttributionManifest, kind: AttributionKind, layer: number, head: number,
  seq: number | string, query_pos: number, key_pos: number): AttributionManifest {
  if (isCached(manifest, kind, layer, head, seq, query_pos, key_pos)) return manifest;
  const key = manifestKey(layer, head, seq);
  const entry = manifest[key] ?? NO_EDGES;
  return { ...manifest, [key]: { ...entry, [kind]: [...entry[kind], [query_pos, key_pos]] } };
}

/** The token positions to mark as having a cached attribution (either kind). Nothing pinned: the queries
 * (transposed: the keys) that have one; a pinned query (transposed: a pinned key): the other ends of its edges. */
export function cachedMarks(edges: CachedEdges, pinned: number | null, transpose: boolean): Set<number> {
  const all = [...edges.qk, ...edges.ov];
  const [own, other] = transpose ? [1, 0] : [0, 1];
  if (pinned === null) return new Set(all.map((edge) => edge[own]));
  return new Set(all.filter((edge) => edge[own] === pinned).map((edge) => edge[other]));
}

/** Pairs by |attribution|, largest first; equal magnitudes keep the file's order. */
export const sortedPairs = (pairs: FeaturePair[]) =>
  pairs.map((pair, i) => ({ pair, i }))
    .sort((a, b) => Math.abs(b.pair.attribution) - Math.abs(a.pair.attribution) || a.i - b.i)
    .map(({ pair }) => pair);

/** The sum of the terms, which is `total` (before a soft-cap) up to the files' 6-digit rounding. */
export const termsSum = (terms: Record<string, number>) => Object.values(terms).reduce((sum, v) => sum + v, 0);

/** What the terms should add up to: the total before the soft-cap, when the model has one. */
export const termsTarget = (file: AttributionFile) =>
  file.softcap != null && file.pre_softcap_total !== undefined ? file.pre_softcap_total : file.total;

// b_dec: the dictionary's decoder bias; error: its reconstruction error; bias: the head's q/k/v projection bias
/** The terms' sum and the total as shown: 4 significant digits, more (up to 6, the files' precision) while
 * rounding alone makes them differ (-1.7454964 and -1.7455 read -1.7455 twice, not -1.745 and -1.746). */
export function formatSumAndTotal(sum: number, total: number): [string, string] {
  for (let digits = 4; digits < 6; digits++) {
    const f = format(`.${digits}~g`);
    if (f(sum) === f(total)) return [f(sum), f(total)];
  }
  const f = format('.6~g');
  return [f(sum), f(total)];
}

const PART_NAMES: Record<string, string> = { feature: 'features', b_dec: 'b_dec', error: 'error', bias: 'bias' };

/** A term's name in words. QK "a_x_b": query-side part a times key-side part b; OV: a part of the source side. */
export function termLabel(kind: AttributionKind, name: string): string {
  if (kind === 'ov') return `source ${PART_NAMES[name === 'feature_pairs' ? 'feature' : name] ?? name}`;
  if (name === 'feature_pairs') return 'query features × key features';
  const match = /^(\w+?)_x_(\w+)$/.exec(name);
  return match ? `query ${PART_NAMES[match[1]] ?? match[1]} × key ${PART_NAMES[match[2]] ?? match[2]}` : name;
}

export interface TermRow {
  name: string; // the JSON key
  label: string;
  value: number;
}

/** The terms in the file's order, with their labels. */
export const termRows = (file: AttributionFile): TermRow[] =>
  Object.entries(file.terms).map(([name, value]) => ({ name, label: termLabel(file.kind, name), value }));

/** The sides in reading order: QK query · key; OV source (key side) → target (query side). */
export const sideOrder = (kind: AttributionKind): [Side, Side] => (kind === 'qk' ? ['query', 'key'] : ['key', 'query']);

/** A side's name: QK query / key; OV target (output) / source (value). */
export function sideLabel(kind: AttributionKind, side: Side): string {
  if (kind === 'qk') return side;
  return side === 'query' ? 'target' : 'source';
}

/** A feature as shown: "#101", or for OV's head-output-direction target (no feature) "head output". */
export const featureName = (feature: Feature) => (feature === null ? 'head output' : `#${feature}`);

/** What an OV file's target side is, in words; null for QK. */
export function targetText(file: AttributionFile): string | null {
  const target = file.target;
  if (!target) return null;
  if (target.kind === 'head_output_direction') {
    return `the head's own output direction at the query position (|write| = ${target.norm.toPrecision(4)}): ` +
      'no output dictionary is served for this layer';
  }
  return `the pre-activations of ${target.features.length} features of ${target.name} at ${target.hook} ` +
    '(the dictionary of this layer\'s output), those active at the query position';
}

/** The strongest position of a snippet (-1 when no token is active). */
export function snippetPeak(snippet: Snippet): number {
  let peak = -1;
  snippet.activations.forEach((a, i) => {
    if (a > 0 && (peak < 0 || a > snippet.activations[peak])) peak = i;
  });
  return peak;
}

/** The largest activation over snippets (0 when none is active): the shading's full scale. */
export const snippetsMax = (snippets: Snippet[]) =>
  snippets.reduce((max, s) => s.activations.reduce((m, a) => Math.max(m, a), max), 0);

/** What the feature panel shows: a listed pair, a marginal feature, or a marginal feature with one of its
 * top interactions. Indices are into the sorted pairs and the file's marginal lists. */
export type Selection =
  | { kind: 'pair'; index: number }
  | { kind: 'marginal'; side: Side; index: number; interaction: number | null };

export interface FeatureSide {
  side: Side;
  feature: Feature;
  description: string;
  snippets: Snippet[];
  activation: number | null; // null: not known from the file (or OV's head-output target)
}

export interface Detail {
  score: number;
  scoreName: 'attribution' | 'marginal score' | 'pairwise score';
  sides: FeatureSide[]; // in sideOrder; one side for a marginal feature alone
  interactions: Interaction[]; // a marginal's top interactions (empty for a pair)
}

/** The activation of a feature of one side at its position, as the listed pairs give it. */
function activationOf(pairs: FeaturePair[], side: Side, feature: Feature): number | null {
  const pair = pairs.find((p) => p[`${side}_feature`] === feature);
  return pair ? pair[`${side}_activation`] : null;
}

const other = (side: Side): Side => (side === 'query' ? 'key' : 'query');

/** The panel's content for a selection, or null when it names nothing in the file. */
export function detailOf(file: AttributionFile, pairs: FeaturePair[], selection: Selection | null): Detail | null {
  if (!selection) return null;
  const order = sideOrder(file.kind);
  if (selection.kind === 'pair') {
    const pair = pairs[selection.index];
    if (!pair) return null;
    return {
      score: pair.attribution, scoreName: 'attribution', interactions: [],
      sides: order.map((side) => ({
        side, feature: pair[`${side}_feature`], description: pair[`${side}_description`] ?? '',
        snippets: pair[`${side}_snippets`] ?? [], activation: pair[`${side}_activation`],
      })),
    };
  }
  const marginal = file[`${selection.side}_marginals`]?.[selection.index];
  if (!marginal) return null;
  const own: FeatureSide = {
    side: selection.side, feature: marginal.feature, description: marginal.description ?? '',
    snippets: marginal.snippets ?? [], activation: activationOf(file.pairs, selection.side, marginal.feature),
  };
  const interactions = marginal.top_interactions ?? [];
  const partner = selection.interaction === null ? undefined : interactions[selection.interaction];
  if (!partner) return { score: marginal.marginal_score, scoreName: 'marginal score', sides: [own], interactions };
  const theirs: FeatureSide = {
    side: other(selection.side), feature: partner.feature, description: partner.description ?? '',
    snippets: partner.snippets ?? [], activation: activationOf(file.pairs, other(selection.side), partner.feature),
  };
  const sides = order.map((side) => (side === selection.side ? own : theirs));
  return { score: partner.pairwise_score, scoreName: 'pairwise score', sides, interactions };
}
