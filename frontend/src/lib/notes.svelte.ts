/** Per-head notes and labels kept in the browser (localStorage), one set per scanned model, exportable as JSON.
 *
 * `headNotes.for(config)` selects the model's set (keyed by its name and
 * weights hash, so two scans of the same weights share notes); `get`/`set`
 * read and write one head's `{label, note}` (an empty pair is removed);
 * `exported()` is the JSON a user downloads. When storage is unavailable
 * (private mode, a full quota) the notes live for the page only and `problem`
 * says so: never silently lost.
 */

import type { Config } from './types';

export interface HeadNote {
  label: string; // a few words, shown beside the head in the table and the scatter plot
  note: string;
}

type Notes = Record<string, HeadNote>; // "L17H5" -> note

const PREFIX = 'headvis:notes:';

/** The storage key of a model's notes. */
export function notesKey(config: Pick<Config, 'model_name'> & { model?: { weights_sha256?: string } | null }): string {
  return `${PREFIX}${config.model_name}:${config.model?.weights_sha256 ?? ''}`;
}

/** Notes read back from storage; anything that is not a {head: {label, note}} map becomes {} (and is reported). */
export function parseNotes(text: string | null): { notes: Notes; damaged: boolean } {
  if (text === null) return { notes: {}, damaged: false };
  try {
    const value = JSON.parse(text) as unknown;
    if (typeof value !== 'object' || value === null || Array.isArray(value)) return { notes: {}, damaged: true };
    const notes: Notes = {};
    for (const [name, entry] of Object.entries(value as Record<string, unknown>)) {
      const e = entry as Partial<HeadNote> | null;
      if (/^L\d+H\d+$/.test(name) && e && typeof e.label === 'string' && typeof e.note === 'string') {
        notes[name] = { label: e.label, note: e.note };
      }
    }
    return { notes, damaged: false };
  } catch {
    return { notes: {}, damaged: true };
  }
}

export class NotesState {
  notes = $state<Notes>({});
  problem = $state('');
  #key = '';

  for(config: Parameters<typeof notesKey>[0]): this {
    const key = notesKey(config);
    if (key !== this.#key) {
      this.#key = key;
      let text: string | null = null;
      try {
        text = localStorage.getItem(key);
      } catch {
        this.problem = 'the browser keeps no storage for this page: notes last until it closes (export them)';
      }
      const parsed = parseNotes(text);
      this.notes = parsed.notes;
      if (parsed.damaged) this.problem = 'the stored notes were unreadable and start empty';
    }
    return this;
  }

  get(name: string): HeadNote {
    return this.notes[name] ?? { label: '', note: '' };
  }

  set(name: string, change: Partial<HeadNote>) {
    const next = { ...this.get(name), ...change };
    const notes = { ...this.notes };
    if (next.label.trim() || next.note.trim()) notes[name] = next;
    else delete notes[name];
    this.notes = notes;
    try {
      localStorage.setItem(this.#key, JSON.stringify(notes));
      this.problem = '';
    } catch (error) {
      this.problem = `not saved in the browser (${(error as Error).name}): export the notes to keep them`;
    }
  }

  /** The notes as a JSON document: {model, weights_sha256, heads: {name: {label, note}}}. */
  exported(config: Parameters<typeof notesKey>[0]): string {
    return JSON.stringify({ model: config.model_name, weights_sha256: config.model?.weights_sha256 ?? null,
      heads: this.notes }, null, 1);
  }
}

export const headNotes = new NotesState();
