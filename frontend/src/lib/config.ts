/** Questions about config.json: which heads were scanned (and projected), in what order, what a metric is called. */

import type { Config, HeadId } from './types';

export interface HeadRef {
  layer: number;
  head: number;
}

const byLayerThenHead = (a: HeadRef, b: HeadRef) => a.layer - b.layer || a.head - b.head;

/** Every scanned head, by layer then head: the order of the previous / next links. */
export function scannedHeads(config: Pick<Config, 'heads'>): HeadRef[] {
  return config.heads.map(([layer, head]) => ({ layer, head })).sort(byLayerThenHead);
}

const has = (heads: HeadId[], layer: number, head: number) => heads.some(([l, h]) => l === layer && h === head);

export const isScanned = (config: Pick<Config, 'heads'>, layer: number, head: number) => has(config.heads, layer, head);

/** Whether umap/L{l}H{h}.json exists for the head (config.json's umap_heads). */
export const hasUmap = (config: Pick<Config, 'umap_heads'>, layer: number, head: number) =>
  has(config.umap_heads, layer, head);

/** The scanned layers and head indices, ascending: the rows and columns of the layer x head grid. */
export function gridAxes(config: Pick<Config, 'heads'>): { layers: number[]; heads: number[] } {
  const ascending = (values: number[]) => [...new Set(values)].sort((a, b) => a - b);
  return { layers: ascending(config.heads.map(([l]) => l)), heads: ascending(config.heads.map(([, h]) => h)) };
}

/** A metric's label (config's metric_labels, else its name) and description (empty when there is none). */
export function metricInfo(config: Pick<Config, 'metric_labels' | 'metric_descriptions'>, name: string) {
  return { label: config.metric_labels?.[name] ?? name, description: config.metric_descriptions?.[name] ?? '' };
}

/** "L17H5", "l17 h5", "17.5", "17/5" or "17 5" -> {layer: 17, head: 5}; null for anything else. */
export function parseHeadName(text: string): HeadRef | null {
  const match = /^\s*(?:l\s*)?(\d{1,4})\s*(?:h|\.|\/|:|\s)\s*(?:h\s*)?(\d{1,4})\s*$/i.exec(text);
  return match ? { layer: Number(match[1]), head: Number(match[2]) } : null;
}
