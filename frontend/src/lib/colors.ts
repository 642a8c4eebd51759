/** Color scales shared by the views: layers, ranges of values (norms, positions), sequences, metric values,
 * attention weights. */

import { scaleOrdinal, scaleSequential } from 'd3-scale';
import { interpolateBlues, interpolatePlasma, interpolateViridis, schemeTableau10 } from 'd3-scale-chromatic';

/** Plasma without its palest yellow, which vanishes on white. */
const plasma = (t: number) => interpolatePlasma(0.05 + 0.8 * t);
const viridis = (t: number) => interpolateViridis(0.9 * t);

/** One color per layer, dark (first) to bright (last). */
export function layerColor(layers: number[]) {
  const lo = Math.min(...layers);
  const hi = Math.max(...layers);
  return scaleSequential(plasma).domain([lo, hi > lo ? hi : lo + 1]);
}

/** A value over [lo, hi], dark (low) to bright (high). */
export function rangeColor(lo: number, hi: number) {
  return scaleSequential(viridis).domain([lo, hi > lo ? hi : lo + 1]);
}

export function sequenceColor() {
  return scaleOrdinal<number | string, string>(schemeTableau10);
}

/** A point that no cluster holds, when points are colored by cluster. */
export const UNCLUSTERED = '#d5d9df';

/** A metric's value over its extent, pale to deep blue. */
export function valueColor(lo: number, hi: number) {
  return scaleSequential((t: number) => interpolateBlues(0.08 + 0.85 * t)).domain([lo, hi > lo ? hi : lo + 1]);
}

/** A token's background for an attention weight in [0, 1], and whether its text should turn white. */
export function weightBackground(weight: number): string {
  return weight > 0 ? `rgba(40, 89, 197, ${Math.min(1, weight).toFixed(3)})` : 'transparent';
}
export const darkOnWeight = (weight: number) => weight > 0.55;

/** Cluster colors offered in turn for new clusters. */
export const CLUSTER_COLORS = ['#e6194b', '#3cb44b', '#4363d8', '#f58231', '#911eb4', '#42d4f4', '#f032e6', '#9a6324'];

/** A snippet token's background for a feature activation on [0, max] (orange: not attention's blue). */
export function activationBackground(value: number, max: number): string {
  return value > 0 && max > 0 ? `rgba(232, 121, 22, ${Math.min(1, value / max).toFixed(3)})` : 'transparent';
}
export const darkOnActivation = (value: number, max: number) => max > 0 && value / max > 0.7;

/** A signed contribution's color: orange raises the score, blue lowers it. */
export const signColor = (value: number) => (value >= 0 ? '#e07b1a' : '#3f73d6');
