"""Hand-made attention rows with known answers, shared by the tests of both row-statistics backends.

Every case fixes the scores through the keys alone: query[..., 0] = 1, key[..., 0] = s[k] (other dims 0,
scaling 1), so s[q, k] = s[k] for every row q, exactly in float32. Each case states, row by row, the
answer the contract gives: `top_logit_margin` (None: the row has < 2 allowed keys, so margin_counted is
False and the value is 0) and, for uniform rows, `qk_distance` and `qk_distance_sq`.
The ids name the case; sizes are odd (T = 63, 130) so that, with 16-key blocks, a row's largest and
second-largest scores often lie in different key blocks, masked and unmasked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from headvis.metrics import AttentionSpec, RowStats

__all__ = ["KNOWN_CASES", "KnownCase", "assert_known_answers"]

D_HEAD = 16
Margin = Callable[[int, int, int], "float | None"]  # (batch, head, query_pos) -> margin, None = not counted


@dataclass(frozen=True)
class KnownCase:
    id: str
    scores: Callable[[int, int, int], float]  # (batch, kv_head, key_pos) -> s[k]
    margin: Margin
    batch: int = 1
    heads: int = 2
    kv_heads: int = 1
    seq_len: int = 63
    causal: bool = True
    window: int | None = None
    padded: Callable[[int, int], bool] | None = None  # (batch, key_pos) -> True where the key is padding
    distances: Callable[[int], tuple[float, float]] | None = None  # query_pos -> (qk_distance, qk_distance_sq)

    def inputs(self, device: torch.device):
        """query (batch, head, query_pos, d_head), key (batch, kv_head, key_pos, d_head), tokens, spec."""
        b, h, kv, t = self.batch, self.heads, self.kv_heads, self.seq_len
        query = torch.zeros(b, h, t, D_HEAD)
        query[..., 0] = 1.0
        key = torch.zeros(b, kv, t, D_HEAD)
        key[..., 0] = torch.tensor([[[self.scores(i, j, k) for k in range(t)] for j in range(kv)] for i in range(b)])
        key_valid = None
        if self.padded is not None:
            key_valid = torch.tensor([[not self.padded(i, k) for k in range(t)] for i in range(b)]).to(device)
        tokens = (torch.arange(t) % 5).expand(b, t).to(device)
        spec = AttentionSpec(causal=self.causal, scaling=1.0, window=self.window, key_valid=key_valid)
        return query.to(device), key.to(device), tokens, spec


def _ramp(b: int, kv: int, k: int) -> float:
    return k / 4  # row q's two largest allowed (causal) keys are q and q - 1: margin 1/4


def _one_high(b: int, kv: int, k: int) -> float:
    return 3.0 if k == 0 else 1.0  # [3, 1, 1, ...]: margin 2


def _from_row_1(value: float) -> Margin:
    return lambda b, h, q: None if q == 0 else value


KNOWN_CASES = [
    # Two equal top scores in different key blocks (keys 5 and 40): the second largest counts the tie.
    KnownCase("tied-top-T63", lambda b, kv, k: 4.0 if k in (5, 40) else 1.0,
              lambda b, h, q: None if q == 0 else (3.0 if 5 <= q < 40 else 0.0)),
    KnownCase("scores-3-1-1-T63", _one_high, _from_row_1(2.0)),
    # Largest in the diagonal block, second largest in the block before it at q = 16, 32, ...
    KnownCase("ramp-T130", _ramp, _from_row_1(0.25), seq_len=130),
    KnownCase("ramp-bidir-T63", _ramp, lambda b, h, q: 0.25, causal=False),  # row 0 reads every key
    # The largest (key 3) in an unmasked block, the second (key 50) in a later, masked one.
    KnownCase("max-early-second-late-T63", lambda b, kv, k: {3: 8.0, 50: 4.0}.get(k, 0.0),
              lambda b, h, q: None if q == 0 else (0.0 if q < 3 else 8.0 if q < 50 else 4.0)),
    KnownCase("T1", _ramp, lambda b, h, q: None, seq_len=1),
    KnownCase("T2", lambda b, kv, k: (1.0, 3.0)[k], _from_row_1(2.0), seq_len=2),
    KnownCase("window1-T63", _ramp, lambda b, h, q: None, window=1),  # one allowed key per row
    # Batch 0 pads keys < 20, batch 1 keys >= 50; padded keys score 10 and must not count.
    KnownCase("padding-T63", lambda b, kv, k: 10.0 if (k < 20 if b == 0 else k >= 50) else k / 4,
              lambda b, h, q: (None if q <= 20 else 0.25) if b == 0 else (None if q == 0 else 0.25),
              batch=2, padded=lambda b, k: k < 20 if b == 0 else k >= 50),
    # GQA: query heads 0, 1 read kv head 0 (ramp), heads 2, 3 kv head 1 ([3, 1, 1, ...]).
    KnownCase("gqa-H4-KV2-T63", lambda b, kv, k: _ramp(b, kv, k) if kv == 0 else _one_high(b, kv, k),
              lambda b, h, q: None if q == 0 else (0.25 if h < 2 else 2.0), heads=4, kv_heads=2),
    # Uniform rows: p = 1 / (q + 1) over d = 0..q, so E[d] = q / 2 and E[d^2] = q (2q + 1) / 6.
    KnownCase("uniform-T130", lambda b, kv, k: 0.0, _from_row_1(0.0), seq_len=130,
              distances=lambda q: (q / 2, q * (2 * q + 1) / 6)),
    KnownCase("uniform-bidir-T63", lambda b, kv, k: 0.0, lambda b, h, q: 0.0, causal=False,
              distances=lambda q: (sum(abs(q - k) for k in range(63)) / 63, sum((q - k) ** 2 for k in range(63)) / 63)),
]


def assert_known_answers(case: KnownCase, stats: RowStats, distance_rtol: float = 1e-5) -> None:
    """`stats` gives the case's margins, margin_counted and (uniform rows) distances, row by row."""
    b, h, t = case.batch, case.heads, case.seq_len
    answers = [[[case.margin(i, j, q) for q in range(t)] for j in range(h)] for i in range(b)]
    counted = torch.tensor([[[a is not None for a in row] for row in head] for head in answers])
    margin = torch.tensor([[[a or 0.0 for a in row] for row in head] for head in answers])
    got_counted = stats.margin_counted.cpu()
    assert got_counted.dtype == torch.bool and got_counted.shape == counted.shape, "margin_counted: dtype or shape"
    bad = (got_counted != counted).nonzero()
    assert not len(bad), f"margin_counted: {len(bad)} rows differ, first (batch, head, query_pos) {bad[0].tolist()}"
    torch.testing.assert_close(stats.metrics["top_logit_margin"].cpu(), margin, atol=1e-6, rtol=0,
                               msg=lambda m: f"top_logit_margin: {m}")
    if case.distances is not None:
        want = torch.tensor([case.distances(q) for q in range(t)]).T[:, None, None].expand(2, b, h, t)
        for name, expected in zip(("qk_distance", "qk_distance_sq"), want):
            torch.testing.assert_close(stats.metrics[name].cpu(), expected.float(), atol=1e-5, rtol=distance_rtol,
                                       msg=lambda m, name=name: f"{name}: {m}")
