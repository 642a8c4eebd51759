"""A feature's description derived from the data alone (no language model): facts, not guesses.

    fires on " the" (38%), " a" (12%); strongest on " the" (6 of 8 top examples), after " of" (5 of 8);
    max 7.31; active on 0.4% of 32,768 tokens

- "fires on": the tokens the feature is most often active on, each with its share of the feature's
  activations (count of activations > 0 on that token / all of them); up to MAX_NAMED tokens whose
  share is at least MIN_SHARE, else the single most frequent one ("fires on many tokens, most often").
  Shares are marked ">=" when the token table was pruned (`token_counts_exact` false).
- "strongest on": the token at the centre of the top windows, named when it is the centre of at
  least half of them and at least two (or of the only one); "after": the token before the centre, named when it is the same in at least
  half of them and at least two.
- "max": the largest activation; "active on": activations > 0 / tokens scanned.
A feature never active says `never active in N tokens`.
"""

from __future__ import annotations

import json
from collections import Counter

__all__ = ["MAX_NAMED", "MIN_SHARE", "derive_description", "quote_token"]

MAX_NAMED = 3
MIN_SHARE = 0.05


def quote_token(token: str) -> str:
    """A token as a JSON string: spaces stay visible inside the quotes, newlines become \\n."""
    return json.dumps(token, ensure_ascii=False)


def _percent(share: float) -> str:
    value = 100.0 * share
    return f"{value:.0f}%" if value >= 10 else f"{value:.2g}%"


def derive_description(*, n_tokens: int, count: int, max_activation: float, top_tokens: list[tuple[str, int]],
                       top_examples: list[tuple[str, str | None]], exact: bool = True) -> str:
    """The description of one feature.

    top_tokens: (token, activations on it), most frequent first; top_examples: (centre token, the
    token before it or None at position 0) of each top window, highest first.
    """
    if count == 0:
        return f"never active in {n_tokens:,} tokens"
    parts = []
    at_least = "" if exact else ">="
    shares = [(token, n / count) for token, n in top_tokens if n > 0]
    named = [(token, share) for token, share in shares[:MAX_NAMED] if share >= MIN_SHARE]
    if named:
        parts.append("fires on " + ", ".join(f"{quote_token(t)} ({at_least}{_percent(s)})" for t, s in named))
    elif shares:
        token, share = shares[0]
        parts.append(f"fires on many tokens, most often {quote_token(token)} ({at_least}{_percent(share)})")
    n = len(top_examples)
    if n:
        centre, centre_n = Counter(t for t, _ in top_examples).most_common(1)[0]
        before = Counter(b for _, b in top_examples if b is not None).most_common(1)
        strongest = ""
        if 2 * centre_n >= n and (centre_n >= 2 or n == 1):
            strongest = f"strongest on {quote_token(centre)} ({centre_n} of {n} top examples)"
        after = ""
        if before and 2 * before[0][1] >= n and before[0][1] >= 2:
            after = f"after {quote_token(before[0][0])} ({before[0][1]} of {n}"
            after += ")" if strongest else " top examples)"
        if strongest and after:
            parts.append(f"{strongest}, {after}")
        elif strongest or after:
            parts.append(strongest or f"top examples {after}")
    parts.append(f"max {max_activation:.3g}")
    parts.append(f"active on {_percent(count / max(n_tokens, 1))} of {n_tokens:,} tokens")
    return "; ".join(parts)
