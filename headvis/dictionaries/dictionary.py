"""A sparse dictionary (an SAE or a transcoder) in memory: its weights, and how it encodes and decodes.

Encoding is SAELens' own, per architecture (x: (..., d_in), float32):

    sae_in = x - b_dec * apply_b_dec_to_input      # SAEs; a transcoder never subtracts b_dec (d_out wide)
    pre    = sae_in @ W_enc + b_enc                 # hidden_pre, (..., d_sae)
    standard:  acts = relu(pre)
    topk:      acts = relu(pre) at the k indices torch.topk(pre, k) picks, 0 elsewhere
               (ReLU after the selection: fewer than k positive pre-activations give L0 < k)
    jumprelu:  acts = relu(pre) * (pre > threshold)  (strict >; the ReLU matters for a negative threshold)
    decode:    acts @ W_dec + b_dec                 # (..., d_out)

A skip transcoder also has W_skip (d_out, d_in): `reconstruct(x)` adds x @ W_skip.T, `decode` never
does (it sees no x). Normalizations SAELens applies at run time are folded into the weights by
`load_dictionary` or refused there, so a loaded Dictionary always reads raw activations.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from headvis.errors import HeadvisError

__all__ = ["ACTIVATIONS", "Dictionary", "check_matches_model"]

ACTIVATIONS = ("standard", "topk", "jumprelu")


@dataclass
class Dictionary:
    """One SAELens dictionary: the interface the attributions are written against."""

    name: str  # folder name, used in file names and replies
    path: Path
    architecture: str  # activation kind: "standard" | "topk" | "jumprelu" (transcoders too)
    hook_name: str  # SAELens input hook, e.g. "blocks.5.hook_resid_pre"
    hook_name_out: str | None  # transcoders: the output hook; None for SAEs
    layer: int  # parsed from hook_name
    hook: str  # "resid_pre" | "resid_mid" | "resid_post"
    d_in: int
    d_sae: int
    d_out: int  # == d_in for an SAE
    W_enc: Tensor  # (d_in, d_sae) float32
    b_enc: Tensor  # (d_sae,)
    W_dec: Tensor  # (d_sae, d_out)
    b_dec: Tensor  # (d_out,)
    threshold: Tensor | None  # (d_sae,) jumprelu
    k: int | None  # topk
    apply_b_dec_to_input: bool  # always False for a transcoder
    model_name: str | None
    is_transcoder: bool
    # headvis' additions
    W_skip: Tensor | None = None  # (d_out, d_in) skip transcoders: reconstruct(x) adds x @ W_skip.T
    metadata: dict[str, Any] = field(default_factory=dict)  # the cfg's metadata (context_size, prepend_bos, ...)
    folded: tuple[str, ...] = ()  # what load_dictionary folded into the weights, e.g. an activation scale

    def pre_activations(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_sae): SAELens' hidden_pre."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """(..., d_sae) pre-activations -> (..., d_sae) feature activations."""
        if self.architecture == "topk":
            values, indices = torch.topk(pre, k=self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, indices, values.relu())
        acts = pre.relu()
        if self.architecture == "jumprelu":
            acts = acts * (pre > self.threshold).to(acts.dtype)
        return acts

    def encode(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_sae) feature activations."""
        return self.activate(self.pre_activations(x))

    def decode(self, acts: Tensor) -> Tensor:
        """(..., d_sae) -> (..., d_out)."""
        return acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def reconstruct(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_out): decode(encode(x)), plus the skip term of a skip transcoder."""
        out = self.decode(self.encode(x))
        if self.W_skip is not None:
            out = out + x.to(self.W_skip.dtype) @ self.W_skip.T
        return out

    def to(self, device: torch.device | str) -> "Dictionary":
        """This dictionary with every tensor on `device` (tensors already there are shared, as Tensor.to does)."""
        moved = {name: getattr(self, name).to(device) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        for name in ("threshold", "W_skip"):
            value = getattr(self, name)
            moved[name] = value.to(device) if value is not None else None
        return replace(self, **moved)


def _name_key(name: str) -> str:
    """'EleutherAI/Pythia-70M' -> 'pythia70m': hub prefix, case and punctuation dropped."""
    return re.sub(r"[^a-z0-9]", "", name.rsplit("/", 1)[-1].lower())


def check_matches_model(d: Dictionary, info) -> None:
    """Refuse a dictionary that cannot read this model (`info`: headvis.models.ModelInfo).

    Layer and widths must fit; a model name that clearly differs is only a warning,
    since names differ across hubs ("gpt2-small" in SAELens is "gpt2" on the Hugging Face hub).
    """
    if not 0 <= d.layer < info.n_layers:
        raise HeadvisError(f"dictionary {d.name} reads layer {d.layer} ({d.hook_name}), "
                           f"the model has {info.n_layers} layers (0-{info.n_layers - 1})")
    if d.d_in != info.d_model:
        raise HeadvisError(f"dictionary {d.name} is for d_model {d.d_in}, the model has {info.d_model}")
    if d.d_out != info.d_model:
        raise HeadvisError(f"dictionary {d.name} writes d_out {d.d_out} ({d.hook_name_out}), "
                           f"the model has d_model {info.d_model}")
    if d.model_name and info.name:
        ours, theirs = _name_key(d.model_name), _name_key(info.name)
        if ours and theirs and ours not in theirs and theirs not in ours:
            warnings.warn(f"dictionary {d.name} was trained on {d.model_name!r}, the model is {info.name!r}",
                          UserWarning, stacklevel=2)
