/** Shared pieces of the d3 charts: padded domains, the axis action, the nearest point under the pointer. */

import { extent } from 'd3-array';
import { axisBottom, axisLeft, type AxisDomain, type AxisScale } from 'd3-axis';
import { select } from 'd3-selection';

export interface Margins {
  top: number;
  right: number;
  bottom: number;
  left: number;
}

/** The extent of `values` widened by `pad` of its span on each side (a span of 0 becomes ±1). */
export function paddedDomain(values: Iterable<number>, pad = 0.05): [number, number] {
  const [lo, hi] = extent(values);
  if (lo === undefined || hi === undefined) return [0, 1];
  if (lo === hi) return [lo - 1, hi + 1];
  const margin = (hi - lo) * pad;
  return [lo - margin, hi + margin];
}

export interface AxisOptions<Domain extends AxisDomain> {
  scale: AxisScale<Domain>; // linear or band; `ticks` only matters to the first
  side: 'bottom' | 'left';
  ticks?: number;
}

/** `<g use:axis={{scale, side}}>`: draws a d3 axis into the group and redraws it when the options change. */
export function axis<Domain extends AxisDomain>(node: SVGGElement, options: AxisOptions<Domain>) {
  const draw = ({ scale, side, ticks = 6 }: AxisOptions<Domain>) => {
    const make = side === 'bottom' ? axisBottom(scale) : axisLeft(scale);
    select(node).call(make.ticks(ticks));
  };
  draw(options);
  return { update: draw };
}

/** The index of the point (in pixels) nearest to (x, y) within `radius` pixels, or -1. Linear: the
 * charts hold a few thousand points at most, and a scan per pointer move costs well under 1 ms. */
export function nearest(xs: ArrayLike<number>, ys: ArrayLike<number>, x: number, y: number, radius: number): number {
  let best = -1;
  let bestDistance = radius * radius;
  for (let i = 0; i < xs.length; i++) {
    const d = (xs[i] - x) ** 2 + (ys[i] - y) ** 2;
    if (d <= bestDistance) {
      best = i;
      bestDistance = d;
    }
  }
  return best;
}
