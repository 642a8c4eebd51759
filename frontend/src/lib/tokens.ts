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

export type ContextPiece = { gap: true } | { gap: false; pos: number; text: string; role: 'query' | 'key' | 'both' | null };

/** The tokens around an edge's query and key: `radius` tokens on each side of each, "…" where the two stretches
 * do not meet, the query and the key marked. For the umap tab's tooltips and its highlighted point. */
export function edgeContext(tokens: string[], query: number, key: number, radius = 3): ContextPiece[] {
  const shown = new Set<number>();
  for (const centre of [key, query]) {
    for (let pos = Math.max(0, centre - radius); pos <= Math.min(tokens.length - 1, centre + radius); pos++) shown.add(pos);
  }
  const pieces: ContextPiece[] = [];
  let last = -1;
  for (const pos of [...shown].sort((a, b) => a - b)) {
    if (pos > last + 1) pieces.push({ gap: true });
    const role = pos === query && pos === key ? 'both' : pos === query ? 'query' : pos === key ? 'key' : null;
    pieces.push({ gap: false, pos, text: tokenText(tokens[pos]), role });
    last = pos;
  }
  if (last >= 0 && last < tokens.length - 1) pieces.push({ gap: true });
  return pieces;
}
