"""Captured queries and keys give exactly the probabilities of the model's own eager attention."""

from __future__ import annotations

import pytest
import torch

from headvis.capture import CaptureSession
from headvis.metrics import ref_pattern
from headvis.models import load_model, output_projections


def _eager_and_captured(lm, input_ids, attention_mask=None):
    captured = {}
    with CaptureSession(lm.model, set(range(lm.info.n_layers)), lambda c: captured.__setitem__(c.layer, c)) as s:
        s.run(input_ids, attention_mask)
    lm.model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            eager = lm.model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    finally:
        lm.model.set_attn_implementation("headvis")
    return captured, eager.attentions


def _check(lm, input_ids, attention_mask=None, atol=1e-5):  # fp32; sdpa vs eager drift over layers
    captured, eager = _eager_and_captured(lm, input_ids, attention_mask)
    assert sorted(captured) == list(range(lm.info.n_layers))
    for layer, capture in captured.items():
        assert capture.key.shape[1] == lm.info.n_kv_heads, "keys must not be repeated"
        assert capture.query.shape[1] == lm.info.n_heads
        pattern = ref_pattern(capture.query, capture.key, capture.spec)
        expected = eager[layer].float()
        if attention_mask is not None:  # padded query rows are not compared: nothing reads them
            rows = attention_mask.bool()[:, None, :, None]
            pattern, expected = pattern * rows, expected * rows
        err = (pattern - expected).abs().max().item()
        assert err <= atol, f"layer {layer}: max |p - eager| = {err:.3g}"
    return captured


@pytest.mark.slow
def test_llama_smollm2_real_weights(smollm):
    ids = smollm.tokenizer("def add(a, b):\n    return a + b\n\nprint(add(1, 2))", return_tensors="pt").input_ids
    captured = _check(smollm, ids)
    assert captured[0].spec.causal and captured[0].spec.scaling == pytest.approx(64**-0.5)
    assert {l: w.shape for l, w in output_projections(smollm.model).items()}[0] == (576, 576)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "bert", "mistral", "gemma2"])
def test_tiny_random_models(arch, tiny_model_dir):
    lm = load_model(str(tiny_model_dir(arch)))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 23), generator=g)
    captured = _check(lm, ids)
    assert captured[0].spec.causal == (arch != "bert")
    if arch == "mistral":
        assert captured[0].spec.window == 5
    if arch == "gemma2":
        assert captured[0].spec.softcap == 2.0
    projections = output_projections(lm.model)
    assert sorted(projections) == list(range(lm.info.n_layers))
    assert all(w.shape == (lm.info.d_model, lm.info.n_heads * lm.info.d_head) for w in projections.values())


def test_bert_padding_mask(tiny_model_dir):
    lm = load_model(str(tiny_model_dir("bert")))
    ids = torch.randint(0, 1000, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    captured = _check(lm, ids, mask)
    assert captured[0].spec.key_valid is not None


def test_output_matches_plain_sdpa_forward(tiny_model_dir):
    """Capturing changes nothing in what the model computes."""
    lm = load_model(str(tiny_model_dir("gpt2")))
    ids = torch.randint(0, 1000, (1, 19))
    with torch.inference_mode():
        lm.model.set_attn_implementation("sdpa")
        plain = lm.model(input_ids=ids).last_hidden_state
        lm.model.set_attn_implementation("headvis")
        ours = lm.model(input_ids=ids).last_hidden_state
    assert torch.allclose(plain, ours, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_a_head_subset_and_a_process_slice_get_their_own_sinks_and_keys(tiny_model_dir, backend):
    """A model with a sink logit per query head (granite_swa, sinks -2..3, 4 query / 2 kv heads): the row
    statistics of a subset of heads (--heads 1-2), and of the heads a --tp process holds (heads 2-3, kv head 1,
    head_offset 2), are those heads' rows of the all-heads statistics (a subset used to read heads 0-1's sinks)."""
    import dataclasses

    from headvis.backends import resolve_backend
    from headvis.metrics import distance_bin_edges
    from headvis.pipeline import HeadSelection, _row_stats

    lm = load_model(str(tiny_model_dir("granite_swa")), device="cpu")
    captured = {}
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with CaptureSession(lm.model, {0}, lambda c: captured.__setitem__(c.layer, c)) as session:
        session.run(ids)
    capture = captured[0]
    assert capture.spec.sinks is not None and len(set(capture.spec.sinks.tolist())) == 4
    fn = resolve_backend(backend, torch.device("cpu"))[1]
    edges = distance_bin_edges(24, True)
    run = lambda selection, c: _row_stats(fn, selection, c, ids, top_k=3, bin_edges=edges)  # noqa: E731
    held, whole = run(HeadSelection([0], [0, 1, 2, 3], 4, 2), capture)
    assert held.slots == [0, 1, 2, 3] and held.key.shape[1] == 2  # kv heads not repeated
    process = dataclasses.replace(capture, query=capture.query[:, 2:], key=capture.key[:, 1:],
                                  spec=dataclasses.replace(capture.spec, sinks=capture.spec.sinks[2:]), head_offset=2)
    for heads, part, rows in (([1, 2], capture, [1, 2]), ([0, 3, 2], process, [3, 2]), ([2, 3], process, [2, 3])):
        held, stats = run(HeadSelection([0], heads, 4, 2), part)
        assert [heads[s] for s in held.slots] == held.heads == rows
        for name, value in stats.metrics.items():
            assert torch.allclose(value, whole.metrics[name][:, rows], atol=1e-6), (heads, name)
        assert torch.equal(stats.top_indices, whole.top_indices[:, rows])
    held, stats = run(HeadSelection([0], [0, 1], 4, 2), process)
    assert held.slots == [] and stats is None  # holds none of them
    whole_sinks = dataclasses.replace(process, spec=capture.spec)  # a tp plan that leaves the sinks whole
    for heads in ([2, 3], [3]):
        held, stats = run(HeadSelection([0], heads, 4, 2), whole_sinks)
        assert held.spec.sinks.tolist() == capture.spec.sinks[heads].tolist()
        assert torch.allclose(stats.metrics["pattern_entropy"], whole.metrics["pattern_entropy"][:, heads], atol=1e-6)
