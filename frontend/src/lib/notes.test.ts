import { describe, expect, it } from 'vitest';
import { notesKey, parseNotes } from './notes.svelte';

describe('notes', () => {
  it('key one set per model name and weights', () => {
    expect(notesKey({ model_name: 'gpt2', model: { weights_sha256: 'ab' } })).toBe('headvis:notes:gpt2:ab');
    expect(notesKey({ model_name: 'gpt2' })).toBe('headvis:notes:gpt2:');
  });
  it('read back only well-formed head notes, and say when the stored text is damaged', () => {
    expect(parseNotes(null)).toEqual({ notes: {}, damaged: false });
    expect(parseNotes('{"L1H2": {"label": "prev", "note": "x"}, "bad": {"label": "a", "note": "b"}, "L0H0": 3}'))
      .toEqual({ notes: { L1H2: { label: 'prev', note: 'x' } }, damaged: false });
    expect(parseNotes('[1]')).toEqual({ notes: {}, damaged: true });
    expect(parseNotes('{not json')).toEqual({ notes: {}, damaged: true });
  });
});
