/** How a token's text is shown: whitespace made visible, control characters escaped. */

const NAMED: Record<string, string> = { '\t': '⇥', '\r': '␍' };

/** The text to show for `token`: newlines as ↵ (followed by a real line break with `lineBreaks`), tabs
 * as ⇥, a token of spaces alone as one · per space, other control characters as \xNN, the empty token as ∅. */
export function tokenText(token: string, { lineBreaks = false } = {}): string {
  if (token === '') return '∅';
  if (/^ +$/.test(token)) return '·'.repeat(token.length);
  return token.replace(/[\u0000-\u001f\u007f]/g, (c) =>
    c === '\n' ? (lineBreaks ? '↵\n' : '↵') : NAMED[c] ?? `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}
