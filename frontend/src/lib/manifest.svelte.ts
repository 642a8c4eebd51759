/** The attribution manifest as shared reactive state: read once per page load, extended as the server computes.
 *
 * `attributionManifest.load()` fetches `data/attributions/manifest.json` the
 * first time (later calls share that load); `current` is what it held (empty
 * until then, or when there is no file); `add` lists an edge the server just
 * computed (and wrote, with its manifest entry), so the sequences tab marks it
 * without reading the file again.
 */

import { parseManifest, withEdge } from './attributions';
import { loadManifestFile } from './data';
import type { AttributionKind, AttributionManifest } from './types';

type Added = [kind: AttributionKind, layer: number, head: number, seq: number | string, query_pos: number, key_pos: number];

export class ManifestState {
  current = $state<AttributionManifest>({});
  problem = $state(''); // why the file could not be read, when it could not
  #loading: Promise<AttributionManifest> | null = null;
  #added: Added[] = []; // kept for a load that answers after them with an older file

  /** The manifest (the empty one when there is no file); rejects with a DataError for a damaged one. */
  load(): Promise<AttributionManifest> {
    this.#loading ??= loadManifestFile().then(parseManifest).then(
      (manifest) => {
        this.current = this.#added.reduce((m, edge) => withEdge(m, ...edge), manifest);
        return this.current;
      },
      (error: Error) => {
        this.problem = error.message;
        throw error;
      },
    );
    return this.#loading;
  }

  add(kind: AttributionKind, layer: number, head: number, seq: number | string, query_pos: number, key_pos: number) {
    this.#added.push([kind, layer, head, seq, query_pos, key_pos]);
    this.current = withEdge(this.current, kind, layer, head, seq, query_pos, key_pos);
  }
}

export const attributionManifest = new ManifestState();
