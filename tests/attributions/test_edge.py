"""QK and OV attributions are exact: every term sums to the model's own score, on four families.

The model's own numbers come from its forward pass (the captured post-RoPE
queries and keys, and the eager attention pattern), never from the
decomposition's code. Dictionaries here are stand-ins with the interface the
attribution code reads (encode, W_enc, W_dec, b_dec), so each test controls
exactly what the decomposition sees: random untrained ones, an all-zero one,
and hand-built ones whose answer is known in closed form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from headvis.attributions import KINDS, edge_inputs, ov_attribution, qk_attribution
from headvis.errors import HeadvisError
from headvis.models import load_model

LAYER = 1


@dataclass
class StandIn:
    """A dictionary: TopK encoding of (x - b_dec) @ W_enc + b_enc, or exact least squares onto W_dec's rows."""

    W_enc: torch.Tensor  # (d_model, d_sae)
    W_dec: torch.Tensor  # (d_sae, d_model)
    b_dec: torch.Tensor
    b_enc: torch.Tensor
    k: int | None = 8
    least_squares: bool = False
    name: str = "stand-in"
    hook_name: str = f"blocks.{LAYER}.hook_resid_pre"
    is_transcoder: bool = False
    d_sae: int = field(init=False)

    def __post_init__(self):
        self.d_sae = self.W_dec.shape[0]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.least_squares:  # exact coefficients of x in the span of the decoder rows
            return torch.linalg.lstsq(self.W_dec.T.double(), (x - self.b_dec).T.double()).solution.T.float()
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        values, index = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, index, values.relu())


def random_dictionary(d_model: int, d_sae: int = 64, seed: int = 0, k: int = 8) -> StandIn:
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_model, generator=g)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    return StandIn(W_enc=w_dec.T.clone(), W_dec=w_dec, b_dec=torch.randn(d_model, generator=g) * 0.1,
                   b_enc=torch.zeros(d_sae), k=k)


@pytest.fixture(scope="module", params=["smollm", "gpt2", "gpt_neox", "bert"])
def family(request, smollm, tiny_model_dir):
    lm = smollm if request.param == "smollm" else load_model(str(tiny_model_dir(request.param)))
    g = torch.Generator().manual_seed(7)
    ids = [1] + torch.randint(2, 2000, (9,), generator=g).tolist()
    return request.param, lm, ids


def _model_scores(lm, ids, layer, head):
    """(scores (T, T) from the model's own captured q/k, pattern (T, T) from its eager attention)."""
    inputs = edge_inputs(lm, ids, layer)
    model = lm.model
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    finally:
        model.set_attn_implementation("headvis")
    return inputs.scores[head], out.attentions[layer][0, head].double()


def test_qk_terms_sum_to_the_models_score_and_softmax_gives_its_attention_row(family):
    name, lm, ids = family
    dictionary = random_dictionary(lm.info.d_model)
    head = lm.info.n_heads - 1
    scores, pattern = _model_scores(lm, ids, LAYER, head)
    inputs = edge_inputs(lm, ids, LAYER)
    q = len(ids) - 1
    keys = range(len(ids)) if not lm.info.causal else range(q + 1)  # k = 0 and k = q included
    totals = []
    for k in keys:
        r = qk_attribution(lm, dictionary, ids, 0, LAYER, head, q, k, inputs=inputs)
        assert sum(r["terms"].values()) == pytest.approx(r["pre_softcap_total"], rel=1e-9, abs=1e-9)
        assert r["total"] == pytest.approx(float(scores[q, k]), rel=1e-5, abs=1e-5), (name, k)
        assert r["score"] == pytest.approx(float(scores[q, k]), rel=1e-9)
        assert set(r["terms"]) == {"feature_pairs"} | {f"{a}_x_{b}" for a in KINDS for b in KINDS} - {"feature_x_feature"}
        totals.append(r["total"])
    row = torch.softmax(torch.tensor(totals, dtype=torch.float64), 0)
    assert torch.allclose(row, pattern[q, : len(totals)], atol=2e-6), name


def test_an_all_zero_dictionary_puts_everything_in_error_terms(smollm):
    d = smollm.info.d_model
    zero = StandIn(W_enc=torch.zeros(d, 16), W_dec=torch.zeros(16, d), b_dec=torch.zeros(d), b_enc=torch.zeros(16), k=4)
    ids = smollm.tokenizer("one two three four five six", add_special_tokens=False)["input_ids"]
    r = qk_attribution(smollm, zero, [1] + ids, 0, LAYER, 2, 5, 2)
    assert r["pairs"] == [] and r["query_marginals"] == [] and r["key_marginals"] == []
    assert r["terms"]["error_x_error"] == pytest.approx(r["score"], rel=1e-6)
    others = {k: v for k, v in r["terms"].items() if k != "error_x_error"}
    assert all(abs(v) < 1e-9 for v in others.values()), others  # Llama: no biases, no norm shift


def test_hand_built_dictionaries_have_their_closed_form_answers(smollm):
    """x_q carried by features 0 and 1 as 0.3 x_q + 0.7 x_q, x_k by feature 2: the pairs are 0.3 s and 0.7 s."""
    ids = [1] + smollm.tokenizer("a b c d e f g", add_special_tokens=False)["input_ids"]
    q, k, head = 6, 3, 4
    resid = edge_inputs(smollm, ids, LAYER).resid
    xq, xk = resid[q].double(), resid[k].double()
    rows = torch.stack([0.3 * xq, 0.7 * xq, xk]).float()  # decoder rows; activations 1 where they apply

    class Exact(StandIn):
        def encode(self, x):
            out = torch.zeros(x.shape[0], 3)
            for i, row in enumerate(x):
                if torch.allclose(row, resid[q]):
                    out[i, :2] = 1.0
                elif torch.allclose(row, resid[k]):
                    out[i, 2] = 1.0
            return out

    d = smollm.info.d_model
    exact = Exact(W_enc=torch.zeros(d, 3), W_dec=rows, b_dec=torch.zeros(d), b_enc=torch.zeros(3))
    r = qk_attribution(smollm, exact, ids, 0, LAYER, head, q, k)
    s = r["score"]
    got = {(p["query_feature"], p["key_feature"]): p["attribution"] for p in r["pairs"]}
    assert set(got) == {(0, 2), (1, 2)}
    assert got[(0, 2)] == pytest.approx(0.3 * s, rel=1e-4) and got[(1, 2)] == pytest.approx(0.7 * s, rel=1e-4)
    assert abs(r["terms"]["feature_pairs"] - s) < 1e-4 * abs(s)
    assert [m["feature"] for m in r["query_marginals"]] == [1, 0]  # by |marginal|, largest first
    assert r["key_marginals"][0]["marginal_score"] == pytest.approx(s, rel=1e-4)


def test_ov_writes_of_a_row_sum_to_the_heads_output_along_its_direction(family):
    """Target: the head's output direction at q. Summed over every key, the edges give ||output_q||."""
    name, lm, ids = family
    dictionary = random_dictionary(lm.info.d_model, seed=3)
    inputs = edge_inputs(lm, ids, LAYER)
    head, q = 1, len(ids) - 2
    keys = range(len(ids)) if not lm.info.causal else range(q + 1)
    totals = [ov_attribution(lm, dictionary, ids, 0, LAYER, head, q, k, inputs=inputs) for k in keys]
    for r in totals:
        assert r["total"] == pytest.approx(r["score"], rel=1e-6, abs=1e-9), name  # parts = p W_O v_k on target
        assert sum(v for v in r["terms"].values()) == pytest.approx(r["total"], rel=1e-9, abs=1e-12)
    assert sum(r["total"] for r in totals) == pytest.approx(totals[0]["target"]["norm"], rel=1e-5), name


def test_ov_onto_a_downstream_dictionary_is_complete_per_target_feature(smollm):
    dictionary = random_dictionary(smollm.info.d_model, seed=1)
    target = random_dictionary(smollm.info.d_model, d_sae=128, seed=2, k=16)
    target.hook_name = f"blocks.{LAYER}.hook_resid_post"
    ids = [1] + smollm.tokenizer("def f(x): return x + 1", add_special_tokens=False)["input_ids"]
    inputs = edge_inputs(smollm, ids, LAYER)
    q, k = len(ids) - 1, 3
    r = ov_attribution(smollm, dictionary, ids, 0, LAYER, 0, q, k, target=target,
                       target_input=inputs.resid[q], inputs=inputs)
    assert r["target"]["kind"] == "dictionary" and len(r["target"]["features"]) == len(r["query_marginals"]) > 0
    assert r["total"] == pytest.approx(r["score"], rel=1e-6, abs=1e-9)
    for m in r["query_marginals"]:
        value = r["target"]["values"][r["target"]["features"].index(m["feature"])]
        assert m["marginal_score"] == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_bad_edges_and_dictionaries_are_refused(smollm):
    dictionary = random_dictionary(smollm.info.d_model)
    ids = [1, 300, 301, 302]
    with pytest.raises(HeadvisError, match="is not a key that query_pos 1 may attend to"):
        qk_attribution(smollm, dictionary, ids, 0, LAYER, 0, 1, 2)  # causal: a key after the query
    with pytest.raises(HeadvisError, match="outside the sequence"):
        qk_attribution(smollm, dictionary, ids, 0, LAYER, 0, 4, 0)
    elsewhere = random_dictionary(smollm.info.d_model)
    elsewhere.hook_name = "blocks.5.hook_resid_pre"
    with pytest.raises(HeadvisError, match="need a sparse autoencoder of blocks.1.hook_resid_pre"):
        qk_attribution(smollm, elsewhere, ids, 0, LAYER, 0, 2, 1)
    narrow = random_dictionary(64)
    with pytest.raises(HeadvisError, match="width 64"):
        qk_attribution(smollm, narrow, ids, 0, LAYER, 0, 2, 1)
