import { describe, expect, it } from 'vitest';
import { edgeContext, tokenText } from './tokens';

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

describe('edgeContext', () => {
  const tokens = Array.from({ length: 20 }, (_, i) => `t${i}`);
  const render = (pieces: ReturnType<typeof edgeContext>) =>
    pieces.map((p) => (p.gap ? '…' : p.role ? `[${p.text}:${p.role}]` : p.text)).join(' ');

  it('joins the stretches around a near query and key, with gaps at the ends', () => {
    expect(render(edgeContext(tokens, 10, 8, 2))).toBe('… t6 t7 [t8:key] t9 [t10:query] t11 t12 …');
  });
  it('shows two stretches with a gap between a far query and key', () => {
    expect(render(edgeContext(tokens, 17, 2, 1))).toBe('… t1 [t2:key] t3 … t16 [t17:query] t18 …');
  });
  it('marks a token that is both, and stops at the sequence ends', () => {
    expect(render(edgeContext(tokens, 0, 0, 1))).toBe('[t0:both] t1 …');
    expect(render(edgeContext(tokens, 19, 18, 2))).toBe('… t16 t17 [t18:key] [t19:query]');
    expect(render(edgeContext(['\n', ' '], 1, 0, 3))).toBe('[↵:key] [·:query]');
  });
});
