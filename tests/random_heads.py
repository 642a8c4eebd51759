"""Random attention heads for the float64 brute-force tests: one case table, one input maker, one brute row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from headvis.metrics import AttentionSpec

__all__ = ["CASES", "HeadCase", "brute_row", "make_inputs"]


@dataclass(frozen=True)
class HeadCase:
    id: str
    batch: int
    heads: int
    kv_heads: int
    seq_len: int
    d_head: int
    causal: bool = True
    window: int | None = None
    softcap: float | None = None
    padded: bool = False  # the first sequence's last 3 keys are padding


CASES = [
    HeadCase("B2-H3-KV3-T9-D8-causal", 2, 3, 3, 9, 8),
    HeadCase("B2-H6-KV2-T17-D8-gqa", 2, 6, 2, 17, 8),
    HeadCase("B3-H2-KV1-T11-D4-bidir-pad", 3, 2, 1, 11, 4, causal=False, padded=True),
    HeadCase("B2-H2-KV2-T13-D8-window4", 2, 2, 2, 13, 8, window=4),
    HeadCase("B2-H2-KV1-T10-D8-softcap", 2, 2, 1, 10, 8, softcap=5.0),
    HeadCase("B2-H1-KV1-T2-D4-causal", 2, 1, 1, 2, 4),
    HeadCase("B2-H2-KV1-T7-D4-window1", 2, 2, 1, 7, 4, window=1),
]


def make_inputs(case: HeadCase, vocab: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionSpec]:
    """(query (batch, head, T, d), key (batch, kv_head, T, d), token ids (batch, T), spec), seeded by the case.

    A small vocabulary gives many induction and duplicate rows.
    """
    g = torch.Generator().manual_seed(case.seq_len * 31 + case.heads)
    query = torch.randn(case.batch, case.heads, case.seq_len, case.d_head, generator=g) * 2
    key = torch.randn(case.batch, case.kv_heads, case.seq_len, case.d_head, generator=g) * 2
    tokens = torch.randint(0, vocab, (case.batch, case.seq_len), generator=g)
    key_valid = None
    if case.padded:
        key_valid = torch.ones(case.batch, case.seq_len, dtype=torch.bool)
        key_valid[0, -3:] = False
    spec = AttentionSpec(causal=case.causal, scaling=case.d_head**-0.5, window=case.window, softcap=case.softcap,
                         key_valid=key_valid)
    return query, key, tokens, spec


def brute_row(q: np.ndarray, k: np.ndarray, spec: AttentionSpec, b: int, h: int, i: int
              ) -> tuple[list[int], np.ndarray, np.ndarray]:
    """One attention row in float64 straight from CONTRACT section 1: (allowed keys, scores s, pattern p).

    q: (batch, head, T, d), k: (batch, kv_head, T, d) float64 numpy; query head h reads kv head
    h // (heads / kv_heads). Empty lists when no key is allowed (a fully padded row).
    """
    seq_len = k.shape[2]
    allowed = [j for j in range(seq_len)
               if (j <= i or not spec.causal)
               and (spec.window is None or (i - j < spec.window if spec.causal else abs(i - j) < spec.window))
               and (spec.key_valid is None or bool(spec.key_valid[b, j]))]
    if not allowed:
        return [], np.zeros(0), np.zeros(0)
    group = q.shape[1] // k.shape[1]
    s = np.array([q[b, h, i] @ k[b, h // group, j] * spec.scaling for j in allowed])
    if spec.softcap is not None:
        s = np.tanh(s / spec.softcap) * spec.softcap
    e = np.exp(s - s.max())
    return allowed, s, e / e.sum()
