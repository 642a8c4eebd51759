"""TransformerLens hook names on Hugging Face models: each one is the tensor TransformerLens means.

Checked against the model's own output_hidden_states and against the block's
own arithmetic (resid_post = resid_mid + MLP(norm(resid_mid)) for sequential blocks).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel

from headvis.dictionaries import capture_hooks, parse_hook
from headvis.dictionaries.hooks import decoder_layers
from headvis.errors import HeadvisError
from headvis.models import load_model

ATOL = 1e-5  # fp32: the same ops in the same order, recomputed in the test


def _ids(lm, n: int = 2, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, min(lm.info.vocab_size, 1000), (n, length), generator=g)


def _hidden_states(lm, ids, mask=None) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        return lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states


def _hooks(kind: str, n_layers: int) -> list[str]:
    return [f"blocks.{layer}.hook_{kind}" for layer in range(n_layers)]


def _assert_close(what: str, got: torch.Tensor, want: torch.Tensor, atol: float = ATOL) -> None:
    err = (got - want).abs().max().item()
    assert err <= atol, f"{what}: max |diff| = {err:.3g}"


@pytest.mark.parametrize("name, expected", [
    ("blocks.0.hook_resid_pre", (0, "resid_pre")), ("blocks.12.hook_resid_mid", (12, "resid_mid")),
    ("blocks.3.hook_resid_post", (3, "resid_post")),
])
def test_parse_hook(name, expected):
    assert parse_hook(name) == expected


@pytest.mark.parametrize("name", ["blocks.5.hook_mlp_out", "blocks.x.hook_resid_pre", "hook_embed",
                                  "blocks.5.attn.hook_z", "blocks.5.hook_resid_pre.h0", "", None])
def test_parse_hook_refuses(name):
    with pytest.raises(HeadvisError, match="resid_pre, blocks.L.hook_resid_mid and blocks.L.hook_resid_post"):
        parse_hook(name)


def _check_pre_norm(lm, mlp_out) -> None:
    """resid_pre/post against hidden_states; resid_mid + mlp_out(block, resid_mid) == resid_post."""
    n = lm.info.n_layers
    ids = _ids(lm)
    hidden = _hidden_states(lm, ids)
    acts = capture_hooks(lm.model, _hooks("resid_pre", n) + _hooks("resid_mid", n) + _hooks("resid_post", n), ids)
    blocks = decoder_layers(lm.model)
    for layer in range(n):
        pre, mid, post = (acts[f"blocks.{layer}.hook_{kind}"] for kind in ("resid_pre", "resid_mid", "resid_post"))
        assert pre.shape == (2, 12, lm.info.d_model) and pre.dtype == torch.float32 and not pre.is_inference()
        _assert_close(f"resid_pre {layer}", pre, hidden[layer], 0)
        if layer < n - 1:
            _assert_close(f"resid_post {layer}", post, hidden[layer + 1], 0)
            _assert_close(f"resid_post {layer} == resid_pre {layer + 1}", post, acts[f"blocks.{layer + 1}.hook_resid_pre"], 0)
        with torch.inference_mode():
            _assert_close(f"resid_mid {layer} + MLP block", mid + mlp_out(blocks[layer], mid), post)
        assert (mid - pre).abs().max() > 0 and (mid - post).abs().max() > 0
    last = acts[f"blocks.{n - 1}.hook_resid_post"]
    assert (last - hidden[-1]).abs().max() > 1e-3, "the last resid_post must be the layer's output, before the final norm"


def _llama_mlp(block, mid):
    return block.mlp(block.post_attention_layernorm(mid))


def test_smollm_hooks(smollm):
    _check_pre_norm(smollm, _llama_mlp)
    ids = _ids(smollm)
    captured = {}
    handle = decoder_layers(smollm.model)[-1].register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    try:
        last = capture_hooks(smollm.model, ["blocks.29.hook_resid_post"], ids)["blocks.29.hook_resid_post"]
    finally:
        handle.remove()
    _assert_close("last resid_post == the decoder layer's output", last, captured["out"], 0)
    with torch.inference_mode():
        _assert_close("final norm of the last resid_post", smollm.model.norm(last), _hidden_states(smollm, ids)[-1])


def test_forward_stops_after_the_last_hook(smollm):
    calls = []
    handle = decoder_layers(smollm.model)[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        capture_hooks(smollm.model, ["blocks.2.hook_resid_post", "blocks.1.hook_resid_mid"], _ids(smollm))
        assert calls == [], "layers after the last hook must not run"
        capture_hooks(smollm.model, ["blocks.3.hook_resid_post"], _ids(smollm))
        assert calls == [1]
    finally:
        handle.remove()


def test_padding_mask_is_passed(tiny_model_dir):
    lm = load_model(str(tiny_model_dir("mistral")))
    ids = _ids(lm, 2, 9)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding of the first row
    hidden = _hidden_states(lm, ids, mask)
    acts = capture_hooks(lm.model, ["blocks.1.hook_resid_pre"], ids, mask)
    _assert_close("masked resid_pre", acts["blocks.1.hook_resid_pre"], hidden[1], 0)
    unmasked = capture_hooks(lm.model, ["blocks.1.hook_resid_pre"], ids)["blocks.1.hook_resid_pre"]
    assert (unmasked[0] - hidden[1][0]).abs().max() > 1e-4


@pytest.mark.parametrize("arch, mlp_out", [
    ("gpt2", lambda block, mid: block.mlp(block.ln_2(mid))),
    ("mistral", _llama_mlp),
    ("gemma2", lambda block, mid: block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(mid)))),
], ids=["gpt2", "mistral", "gemma2"])
def test_tiny_pre_norm_families(tiny_model_dir, arch, mlp_out):
    _check_pre_norm(load_model(str(tiny_model_dir(arch))), mlp_out)


def test_gemma2_resid_mid_is_after_the_post_attention_norm(tiny_model_dir):
    """Gemma 2 normalizes the attention output before the residual add: resid_mid is that sum."""
    lm = load_model(str(tiny_model_dir("gemma2")))
    block = decoder_layers(lm.model)[0]
    seen = {}
    handle = block.post_attention_layernorm.register_forward_pre_hook(lambda m, args: seen.setdefault("in", args[0]))
    try:
        acts = capture_hooks(lm.model, ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid"], _ids(lm))
    finally:
        handle.remove()
    with torch.inference_mode():
        expected = acts["blocks.0.hook_resid_pre"] + block.post_attention_layernorm(seen["in"])
    _assert_close("gemma2 resid_mid", acts["blocks.0.hook_resid_mid"], expected)


def test_neox_parallel_residual_has_no_resid_mid(tiny_model_dir):
    lm = load_model(str(tiny_model_dir("gpt_neox")))
    assert lm.model.config.use_parallel_residual
    with pytest.raises(HeadvisError, match="parallel residual"):
        capture_hooks(lm.model, ["blocks.0.hook_resid_mid"], _ids(lm))
    hidden = _hidden_states(lm, _ids(lm))
    acts = capture_hooks(lm.model, ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"], _ids(lm))
    _assert_close("neox resid_pre", acts["blocks.0.hook_resid_pre"], hidden[0], 0)
    _assert_close("neox resid_post", acts["blocks.0.hook_resid_post"], hidden[1], 0)


def test_neox_sequential_residual(tmp_path, smollm):
    config = AutoConfig.for_model("gpt_neox", vocab_size=len(smollm.tokenizer), num_hidden_layers=2,
                                  num_attention_heads=4, hidden_size=32, intermediate_size=64,
                                  max_position_embeddings=128, rotary_pct=0.5, use_parallel_residual=False)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path)
    smollm.tokenizer.save_pretrained(tmp_path)
    _check_pre_norm(load_model(str(tmp_path)), lambda block, mid: block.mlp(block.post_attention_layernorm(mid)))


def test_bert_follows_transformer_lens_post_norm_names(tiny_model_dir):
    """TransformerLens' BertBlock: resid_mid = resid_pre + attn_out; resid_post = LN1(resid_mid) + mlp_out;
    the block's output (hidden_states[L + 1]) is LN2(resid_post)."""
    lm = load_model(str(tiny_model_dir("bert")))
    n = lm.info.n_layers
    ids = _ids(lm)
    hidden = _hidden_states(lm, ids)
    acts = capture_hooks(lm.model, _hooks("resid_pre", n) + _hooks("resid_mid", n) + _hooks("resid_post", n), ids)
    for layer, block in enumerate(decoder_layers(lm.model)):
        pre, mid, post = (acts[f"blocks.{layer}.hook_{kind}"] for kind in ("resid_pre", "resid_mid", "resid_post"))
        _assert_close(f"bert resid_pre {layer}", pre, hidden[layer], 0)
        with torch.inference_mode():
            normed_mid = block.attention.output.LayerNorm(mid)
            _assert_close(f"bert resid_post {layer}", post, normed_mid + block.output.dense(block.intermediate(normed_mid)))
            _assert_close(f"bert LN2(resid_post {layer})", block.output.LayerNorm(post), hidden[layer + 1])
        assert (post - hidden[layer + 1]).abs().max() > 1e-3


def test_unmapped_family_refuses_resid_mid_only(tiny_model_dir, monkeypatch):
    lm = load_model(str(tiny_model_dir("gpt2")))
    monkeypatch.setattr(lm.model.config, "model_type", "mystery")
    with pytest.raises(HeadvisError, match="resid_mid is not mapped for model type 'mystery'"):
        capture_hooks(lm.model, ["blocks.0.hook_resid_mid"], _ids(lm))
    assert capture_hooks(lm.model, ["blocks.1.hook_resid_post"], _ids(lm))["blocks.1.hook_resid_post"].shape == (2, 12, 32)


def test_layer_out_of_range(tiny_model_dir):
    lm = load_model(str(tiny_model_dir("gpt2")))
    with pytest.raises(HeadvisError, match="layer 2 is out of range"):
        capture_hooks(lm.model, ["blocks.2.hook_resid_pre"], _ids(lm))
