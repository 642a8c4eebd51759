/** The edge that the sequences tab asked the server to project, kept while the page moves to the umap tab,
 * which then highlights it (and draws it, when the server computed a new point). */

import type { Edge, ProjectReply } from './types';

export interface ProjectionFocus {
  layer: number;
  head: number;
  edge: Edge; // (sequence_id, query_pos, key_pos) as asked
  reply: ProjectReply;
}

class Focus {
  current = $state<ProjectionFocus | null>(null);
}

export const projectionFocus = new Focus();
