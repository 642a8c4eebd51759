import { describe, expect, it } from 'vitest';
import { tokenText } from './tokens';

describe('tokenText', () => {
  it('keeps ordinary text and its spaces', () => {
    expect(tokenText(' the')).toBe(' the');
    expect(tokenText('<|im_start|>')).toBe('<|im_start|>');
  });
  it('makes whitespace-only and empty tokens visible', () => {
    expect(tokenText(' ')).toBe('·');
    expect(tokenText('   ')).toBe('···');
    expect(tokenText('')).toBe('∅');
  });
  it('marks newlines, breaking the line only when asked', () => {
    expect(tokenText('\n  ')).toBe('↵  ');
    expect(tokenText('\n\n', { lineBreaks: true })).toBe('↵\n↵\n');
  });
  it('escapes other control characters', () => {
    expect(tokenText('a\tb\r')).toBe('a⇥b␍');
    expect(tokenText('\u0007\u007f')).toBe('\\x07\\x7f');
  });
});
