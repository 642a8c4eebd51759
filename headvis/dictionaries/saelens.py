"""SAELens dictionary folders on disk: `cfg.json` + `sae_weights.safetensors`, read and written.

Two cfg layouts are read:
- SAELens 6.x: `architecture`, `d_in`, `d_sae`, `dtype`, `apply_b_dec_to_input`,
  `normalize_activations`, `reshape_activations`, `k` (topk; SAELens' default 100 when
  absent), `rescale_acts_by_decoder_norm` (topk, later 6.x), `d_out` (transcoders), and
  a `metadata` object (`meta` in the 6.0 release candidates) with `hook_name`,
  `hook_name_out` (transcoders; early 6.x kept it at the top level), `model_name`,
  `hook_head_index`, `prepend_bos`, `context_size`, `dataset_path`, ...
- before 6.0, flat: `architecture` (default "standard"), `activation_fn_str` or
  `activation_fn` ("relu"; "topk" with `activation_fn_kwargs: {"k": ..}`),
  `hook_name` or `hook_point`, `hook_layer` / `hook_point_layer`, `model_name`,
  `apply_b_dec_to_input` (default true), `normalize_activations` (a string, or a
  bool: true = "expected_average_only_in"), `finetuning_scaling_factor`, ...
A cfg with a `metadata` (or `meta`) object is read as 6.x, any other as flat.

Architectures: standard, topk, jumprelu, and the transcoders transcoder,
skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder (a flat cfg with
a `hook_name_out` is a transcoder too). Tensors: W_enc (d_in, d_sae), b_enc
(d_sae,), W_dec (d_sae, d_out), b_dec (d_out,), threshold or log_threshold
(d_sae,) for jumprelu, W_skip (d_out, d_in) for skip transcoders, scaling_factor
(d_sae,) for flat cfgs with `finetuning_scaling_factor`. Loaded in float32.

What SAELens computes at run time is folded into the weights, exactly:
- `scaling_factor` (decode(acts * s)): W_dec rows *= s (standard and jumprelu);
- `normalize_activations: expected_average_only_in` with the trainer's
  `activation_scaler.json` beside the weights (`{"scaling_factor": sf}`): SAELens'
  fold_activation_norm_scaling_factor, W_enc *= sf, W_dec /= sf, b_dec /= sf.
  Without that file the factor is unknown and the dictionary is refused;
- topk `rescale_acts_by_decoder_norm` (top-k of pre * |W_dec row|, decode of
  acts / |W_dec row|): with n = |W_dec row|, W_enc and b_enc *= n, W_dec /= n.
A transcoder never subtracts b_dec from its input (SAELens' Transcoder.process_sae_in),
whatever its `apply_b_dec_to_input` says. `constant_norm_rescale` and `layer_norm` rescale each token's decoder output by
that token's own input statistics, which `decode(acts)` never sees: refused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from headvis.dictionaries.dictionary import Dictionary
from headvis.dictionaries.hooks import parse_hook
from headvis.errors import HeadvisError
from headvis.io import FILE_MODE, publish_folder, read_json, write_json

__all__ = ["ACTIVATION_SCALER_FILE", "ARCHITECTURES", "CFG_FILE", "LAYOUTS", "WEIGHTS_FILE",
           "check_target", "load_dictionary", "save_dictionary"]

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ACTIVATION_SCALER_FILE = "activation_scaler.json"
LAYOUTS = ("6", "legacy")

# SAELens architecture -> (activation, is_transcoder, has W_skip)
ARCHITECTURES: dict[str, tuple[str, bool, bool]] = {
    "standard": ("standard", False, False),
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "transcoder": ("standard", True, False),
    "skip_transcoder": ("standard", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}
_SAELENS_NAME = {value: key for key, value in ARCHITECTURES.items()}
_REFUSED_ARCHITECTURES = {
    "gated": "gated SAEs gate with a second encoder path headvis does not implement",
    "batchtopk": "a BatchTopK training checkpoint: SAELens saves its inference form as jumprelu",
    "matryoshka_batchtopk": "a BatchTopK training checkpoint: SAELens saves its inference form as jumprelu",
}
_NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
_METADATA_KEYS = ("model_name", "hook_name", "model_class_name", "hook_head_index",
                  "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens",
                  "neuronpedia_id", "context_size", "seqpos_slice", "dataset_path",
                  "sae_lens_version", "sae_lens_training_version")  # fields every SAELens 6 reads
_SAELENS_6 = "6.0.0"  # SAELens reads a cfg as 6.x only when metadata.sae_lens_version >= 6.0.0-rc.0


@dataclass
class _Cfg:
    """cfg.json of either layout, as the fields headvis reads."""

    architecture: str  # the SAELens name
    d_in: int
    d_sae: int
    d_out: int | None
    k: int | None
    apply_b_dec_to_input: bool
    normalize_activations: str
    rescale_acts_by_decoder_norm: bool
    finetuning_scaling_factor: bool
    hook_name: str
    hook_name_out: str | None
    hook_layer: int | None  # flat cfgs only, checked against hook_name
    model_name: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


def _positive_int(value, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HeadvisError(f"{where}: {CFG_FILE} {what} must be a positive integer, not {value!r}")
    return value


def _normalization(value, where: str) -> str:
    if value is None or value is False:
        return "none"
    if value is True:  # SAELens before 4.x: a bool
        return "expected_average_only_in"
    if value not in _NORMALIZATIONS:
        raise HeadvisError(f"{where}: normalize_activations {value!r} is unknown "
                           f"(SAELens has {', '.join(_NORMALIZATIONS)})")
    return value


def _parse_cfg(cfg: dict, where: str) -> _Cfg:
    meta = cfg.get("metadata", cfg.get("meta"))
    layout = "6" if isinstance(meta, dict) else "legacy"
    meta = meta if isinstance(meta, dict) else {}
    if layout == "6":
        architecture = cfg.get("architecture")
        if architecture is None:
            raise HeadvisError(f"{where}: {CFG_FILE} has no architecture")
        k = cfg.get("k", 100) if architecture == "topk" else None  # 100: TopKSAEConfig's default
        hook = meta.get("hook_name", cfg.get("hook_name"))
        hook_out = meta.get("hook_name_out", cfg.get("hook_name_out"))
        head_index = meta.get("hook_head_index", cfg.get("hook_head_index"))
        model_name = meta.get("model_name", cfg.get("model_name"))
        hook_layer = None
        finetuning = False
    else:
        architecture = cfg.get("architecture", "standard")
        activation_fn = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
        if activation_fn not in ("relu", "topk", None):
            raise HeadvisError(f"{where}: activation function {activation_fn!r} is not supported (relu, topk)")
        if architecture == "standard" and activation_fn == "topk":  # SAELens 4.x: topk was an activation
            architecture = "topk"
        kwargs = cfg.get("activation_fn_kwargs") or {}
        k = kwargs.get("k", cfg.get("k")) if architecture == "topk" else None
        if architecture == "topk" and k is None:
            raise HeadvisError(f"{where}: a topk {CFG_FILE} needs activation_fn_kwargs.k")
        hook = cfg.get("hook_name", cfg.get("hook_point"))
        hook_out = cfg.get("hook_name_out", cfg.get("out_hook_point"))
        if hook_out and architecture in ("standard", "jumprelu"):
            architecture = "transcoder" if architecture == "standard" else "jumprelu_transcoder"
        head_index = cfg.get("hook_head_index", cfg.get("hook_point_head_index"))
        model_name = cfg.get("model_name")
        hook_layer = cfg.get("hook_layer", cfg.get("hook_point_layer"))
        finetuning = bool(cfg.get("finetuning_scaling_factor", False))
        meta = {key: cfg[key] for key in (*_METADATA_KEYS, "hook_name_out") if key in cfg}
    if architecture in _REFUSED_ARCHITECTURES:
        raise HeadvisError(f"{where}: architecture {architecture!r} is not supported "
                           f"({_REFUSED_ARCHITECTURES[architecture]})")
    if architecture not in ARCHITECTURES:
        raise HeadvisError(f"{where}: architecture {architecture!r} is unknown "
                           f"(headvis reads {', '.join(ARCHITECTURES)})")
    if not isinstance(hook, str) or not hook:
        raise HeadvisError(f"{where}: {CFG_FILE} names no hook (metadata.hook_name or hook_name)")
    if head_index is not None:
        raise HeadvisError(f"{where}: reads one attention head ({hook} head {head_index}); headvis reads whole hooks")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise HeadvisError(f"{where}: reshape_activations {cfg['reshape_activations']!r} is not supported "
                           "(headvis reads residual-stream hooks)")
    is_transcoder = ARCHITECTURES[architecture][1]
    if is_transcoder and not (isinstance(hook_out, str) and hook_out):
        raise HeadvisError(f"{where}: a transcoder's {CFG_FILE} needs hook_name_out")
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm", False))
    if rescale and architecture != "topk":
        raise HeadvisError(f"{where}: rescale_acts_by_decoder_norm is only supported for topk")
    d_out = cfg.get("d_out")
    return _Cfg(
        architecture=architecture,
        d_in=_positive_int(cfg.get("d_in"), "d_in", where),
        d_sae=_positive_int(cfg.get("d_sae"), "d_sae", where),
        d_out=_positive_int(d_out, "d_out", where) if d_out is not None else None,
        k=_positive_int(k, "k", where) if k is not None else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        normalize_activations=_normalization(cfg.get("normalize_activations", "none"), where),
        rescale_acts_by_decoder_norm=rescale,
        finetuning_scaling_factor=finetuning,
        hook_name=hook,
        hook_name_out=hook_out if is_transcoder else None,
        hook_layer=hook_layer,
        model_name=model_name,
        metadata=dict(meta),
    )


def _read_cfg(folder: Path, where: str) -> dict:
    try:
        cfg = read_json(folder / CFG_FILE)
    except json.JSONDecodeError as e:
        raise HeadvisError(f"{where}: {CFG_FILE} is not valid JSON ({e.msg}, line {e.lineno})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise HeadvisError(f"{where}: cannot read {CFG_FILE} ({e})") from e
    if not isinstance(cfg, dict):
        raise HeadvisError(f"{where}: {CFG_FILE} is not a JSON object")
    return cfg


def _read_weights(folder: Path, where: str) -> dict[str, Tensor]:
    try:
        tensors = load_file(folder / WEIGHTS_FILE)
    except (SafetensorError, OSError, ValueError) as e:
        raise HeadvisError(f"{where}: {WEIGHTS_FILE} is not a readable safetensors file ({e})") from e
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise HeadvisError(f"{where}: tensor {key} is {tensor.dtype}, not floating point")
        if not torch.isfinite(tensor).all():
            raise HeadvisError(f"{where}: tensor {key} holds NaN or infinite values")
    return {key: tensor.to(torch.float32) for key, tensor in tensors.items()}


def _activation_scale(folder: Path, where: str) -> float:
    """The scaling factor of an expected_average_only_in dictionary, from activation_scaler.json."""
    file = folder / ACTIVATION_SCALER_FILE
    if not file.is_file():
        raise HeadvisError(f"{where}: normalize_activations 'expected_average_only_in' needs the training "
                           f"scale factor, and there is no {ACTIVATION_SCALER_FILE} beside the weights "
                           "(fold it into the weights, or add that file with {\"scaling_factor\": ...})")
    try:
        factor = read_json(file).get("scaling_factor")
    except (json.JSONDecodeError, OSError, AttributeError) as e:
        raise HeadvisError(f"{where}: {ACTIVATION_SCALER_FILE} is not a JSON object with scaling_factor") from e
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
        raise HeadvisError(f"{where}: {ACTIVATION_SCALER_FILE} scaling_factor must be a positive number, "
                           f"not {factor!r}")
    return float(factor)


def _expect_shape(tensors: dict[str, Tensor], key: str, shape: tuple[int, ...], where: str) -> Tensor:
    tensor = tensors[key]
    if tuple(tensor.shape) != shape:
        raise HeadvisError(f"{where}: {key} has shape {tuple(tensor.shape)}, the cfg says {shape}")
    return tensor


def load_dictionary(path: str | Path) -> Dictionary:
    """Read a SAELens dictionary folder; a HeadvisError with one line says what is wrong."""
    folder = Path(path).expanduser()
    where = f"dictionary {folder}"
    if not folder.is_dir():
        raise HeadvisError(f"{where}: no such folder")
    for file in (CFG_FILE, WEIGHTS_FILE):
        if not (folder / file).is_file():
            raise HeadvisError(f"{where}: {file} is missing")
    cfg = _parse_cfg(_read_cfg(folder, where), where)
    if cfg.k is not None and cfg.k > cfg.d_sae:
        raise HeadvisError(f"{where}: k {cfg.k} exceeds d_sae {cfg.d_sae}")
    layer, hook = parse_hook(cfg.hook_name)
    if cfg.hook_layer is not None and cfg.hook_layer != layer:
        warnings.warn(f"{where}: hook_layer {cfg.hook_layer} disagrees with {cfg.hook_name}; "
                      f"using layer {layer} (SAELens 6 reads the hook name)", UserWarning, stacklevel=2)
    if cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
        raise HeadvisError(f"{where}: normalize_activations {cfg.normalize_activations!r} is not supported: it "
                           "rescales each token's output by that token's input, which decode(acts) cannot see")

    activation, is_transcoder, has_skip = ARCHITECTURES[cfg.architecture]
    tensors = _read_weights(folder, where)
    wanted = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"W_skip"} if has_skip else set())
    if activation == "jumprelu" and "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()  # a JumpReLU training checkpoint
    if activation == "jumprelu":
        wanted.add("threshold")
    missing = sorted(wanted - set(tensors))
    if missing:
        raise HeadvisError(f"{where}: {WEIGHTS_FILE} has no {', '.join(missing)}")
    scale_key = next((key for key in ("scaling_factor", "finetuning_scaling_factor") if key in tensors), None)
    unknown = sorted(set(tensors) - wanted - {scale_key})
    if unknown:
        raise HeadvisError(f"{where}: {WEIGHTS_FILE} holds tensors a {cfg.architecture} dictionary "
                           f"does not have: {', '.join(unknown)}")

    d_in, d_sae = cfg.d_in, cfg.d_sae
    if is_transcoder:
        d_out = cfg.d_out if cfg.d_out is not None else int(tensors["W_dec"].shape[-1])
    elif cfg.d_out not in (None, d_in):
        raise HeadvisError(f"{where}: an SAE reconstructs its input, but d_out {cfg.d_out} != d_in {d_in}")
    else:
        d_out = d_in
    W_enc = _expect_shape(tensors, "W_enc", (d_in, d_sae), where)
    b_enc = _expect_shape(tensors, "b_enc", (d_sae,), where)
    W_dec = _expect_shape(tensors, "W_dec", (d_sae, d_out), where)
    b_dec = _expect_shape(tensors, "b_dec", (d_out,), where)
    threshold = _expect_shape(tensors, "threshold", (d_sae,), where) if activation == "jumprelu" else None
    W_skip = _expect_shape(tensors, "W_skip", (d_out, d_in), where) if has_skip else None

    folded: list[str] = []
    if scale_key is not None:
        scale = _expect_shape(tensors, scale_key, (d_sae,), where)
        if not torch.equal(scale, torch.ones_like(scale)):  # SAELens drops an all-ones factor
            if not cfg.finetuning_scaling_factor:
                raise HeadvisError(f"{where}: {scale_key} is present but finetuning_scaling_factor is not set")
            if activation == "topk":
                raise HeadvisError(f"{where}: a topk dictionary with a {scale_key} is not supported")
            W_dec = W_dec * scale[:, None]
            folded.append(f"{scale_key} into W_dec rows")
    if cfg.normalize_activations == "expected_average_only_in":
        factor = _activation_scale(folder, where)
        W_enc, W_dec, b_dec = W_enc * factor, W_dec / factor, b_dec / factor
        folded.append(f"{ACTIVATION_SCALER_FILE} scaling_factor {factor:g}")
    if cfg.rescale_acts_by_decoder_norm:
        norms = W_dec.norm(dim=-1)  # (d_sae,)
        if not (norms > 0).all():
            raise HeadvisError(f"{where}: rescale_acts_by_decoder_norm with an all-zero W_dec row")
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
        folded.append("rescale_acts_by_decoder_norm")

    return Dictionary(
        name=folder.name,
        path=folder,
        architecture=activation,
        hook_name=cfg.hook_name,
        hook_name_out=cfg.hook_name_out,
        layer=layer,
        hook=hook,
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        W_enc=W_enc.contiguous(),
        b_enc=b_enc.contiguous(),
        W_dec=W_dec.contiguous(),
        b_dec=b_dec.contiguous(),
        threshold=threshold,
        k=cfg.k if activation == "topk" else None,
        apply_b_dec_to_input=cfg.apply_b_dec_to_input and not is_transcoder,
        model_name=cfg.model_name,
        is_transcoder=is_transcoder,
        W_skip=W_skip,
        metadata=cfg.metadata,
        folded=tuple(folded),
    )


def _saelens_architecture(d: Dictionary) -> str:
    key = (d.architecture, d.is_transcoder, d.W_skip is not None)
    if key not in _SAELENS_NAME:
        raise HeadvisError(f"dictionary {d.name}: SAELens has no {d.architecture} "
                           f"{'transcoder' if d.is_transcoder else 'SAE'} architecture to save it as")
    return _SAELENS_NAME[key]


def _cfg_6(d: Dictionary) -> dict:
    meta = {key: value for key, value in d.metadata.items() if key in _METADATA_KEYS}
    version = str(meta.get("sae_lens_version") or "")
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 6:
        meta["sae_lens_version"] = _SAELENS_6
    meta.update(model_name=d.model_name, hook_name=d.hook_name, hook_head_index=None)
    cfg: dict[str, Any] = {
        "architecture": _saelens_architecture(d),
        "d_in": d.d_in,
        "d_sae": d.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": d.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if d.architecture == "topk":
        cfg.update(k=d.k, rescale_acts_by_decoder_norm=False)
    if d.is_transcoder:
        cfg["d_out"] = d.d_out
        meta["hook_name_out"] = d.hook_name_out
    cfg["metadata"] = meta
    return cfg


def _cfg_legacy(d: Dictionary) -> dict:
    architecture = _saelens_architecture(d)
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": d.d_in,
        "d_sae": d.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "activation_fn_str": "topk" if d.architecture == "topk" else "relu",
        "activation_fn_kwargs": {"k": d.k} if d.architecture == "topk" else {},
        "apply_b_dec_to_input": d.apply_b_dec_to_input,
        "finetuning_scaling_factor": False,
        "normalize_activations": "none",
        "model_name": d.model_name,
        "hook_name": d.hook_name,
        "hook_layer": d.layer,
        "hook_head_index": None,
    }
    if d.is_transcoder:
        cfg.update(d_out=d.d_out, hook_name_out=d.hook_name_out)
    for key in ("context_size", "prepend_bos", "dataset_path", "sae_lens_training_version"):
        if key in d.metadata:
            cfg[key] = d.metadata[key]
    return cfg


def check_target(out: Path) -> None:
    """Refuse a path a dictionary may not be written to: a file, or a non-empty folder without cfg.json."""
    if out.exists() and not out.is_dir():
        raise HeadvisError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / CFG_FILE).exists():
        raise HeadvisError(f"{out} is a non-empty folder that is not a dictionary; refusing to replace it")
    # the staging folder and the renames happen in out's parent (made if missing)
    writable = out.absolute().parent if out.exists() else next(p for p in out.absolute().parents if p.exists())
    if not os.access(writable, os.W_OK):
        raise HeadvisError(f"cannot write the dictionary {out}: {writable} is not writable")


def _prepare_target(out: Path) -> Path:
    """A fresh staging folder beside `out`, once `out` may be replaced."""
    check_target(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    except OSError as e:
        raise HeadvisError(f"cannot write the dictionary {out}: {e.strerror or e}") from e


def save_dictionary(d: Dictionary, path: Path, *, layout: str = "6",
                    extra_json: dict[str, Any] | None = None) -> None:
    """Write `d` as a SAELens folder at `path`, atomically (a staging folder, then a rename).

    layout "6" (SAELens 6.x) or "legacy" (flat, before 6.0). `extra_json` adds files
    to the same folder, e.g. {"training.json": {...}}. An existing dictionary folder
    at `path` is replaced; any other non-empty folder is refused.
    """
    if layout not in LAYOUTS:
        raise HeadvisError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    cfg = _cfg_6(d) if layout == "6" else _cfg_legacy(d)
    tensors = {"W_enc": d.W_enc, "b_enc": d.b_enc, "W_dec": d.W_dec, "b_dec": d.b_dec}
    if d.threshold is not None:
        tensors["threshold"] = d.threshold
    if d.W_skip is not None:
        tensors["W_skip"] = d.W_skip
    tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in tensors.items()}
    out = Path(path).expanduser()
    staging = _prepare_target(out)
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE))
        os.chmod(staging / WEIGHTS_FILE, FILE_MODE)
        write_json(staging / CFG_FILE, cfg)
        for name, body in (extra_json or {}).items():
            write_json(staging / name, body)
        publish_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
