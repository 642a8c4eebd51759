"""Capturing every attention layer's queries, keys and values during a forward pass.

One attention function, registered with transformers' `AttentionInterface`
under the name "headvis", serves every architecture that dispatches through
that interface (Llama/SmolLM2, GPT-2, GPT-NeoX, BERT, Mistral, Gemma 2, ...).
It computes the layer's output exactly as the model would (SDPA, or the
model's own eager function when soft-capping or sinks need it), then hands the
post-RoPE queries, the un-repeated keys and values, the per-head output and the
layer's `AttentionSpec` to the active `CaptureSession`.

    with CaptureSession(model, layers={2, 5}, on_layer=print) as session:
        session.run(input_ids)
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from headvis.errors import HeadvisError
from headvis.metrics import AttentionSpec

__all__ = ["IMPLEMENTATION", "CaptureSession", "LayerCapture", "install", "run_attention"]

IMPLEMENTATION = "headvis"


@dataclass
class LayerCapture:
    """What one self-attention layer computed on one batch."""

    layer: int
    module: nn.Module
    query: Tensor  # (batch, head, query_pos, d_head), post-RoPE
    key: Tensor  # (batch, kv_head, key_pos, d_head), post-RoPE, not repeated
    value: Tensor  # (batch, kv_head, key_pos, d_head)
    output: Tensor  # (batch, query_pos, head, d_head): pattern @ value, before the output projection
    spec: AttentionSpec
    head_offset: int = 0  # the model's head number of query's head 0 (a --tp process's own heads: rank x count)


class _StopForward(Exception):
    """Raised after the last wanted layer: the rest of the forward pass is not needed."""


_lock = threading.Lock()  # one capturing forward pass at a time (the session is global state)
_active: "CaptureSession | None" = None


def _float_mask(mask: Tensor | None, spec: AttentionSpec, query: Tensor, key: Tensor) -> Tensor:
    """An additive float mask for eager functions, from SDPA's boolean mask (or None = structural)."""
    if mask is not None and mask.dtype != torch.bool:
        return mask
    if mask is None:
        q = torch.arange(query.shape[2], device=query.device)[:, None]
        k = torch.arange(key.shape[2], device=query.device)[None, :]
        mask = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool, device=query.device)
        if spec.causal:
            mask &= k <= q
        if spec.window is not None:
            mask &= (q - k < spec.window) if spec.causal else ((q - k).abs() < spec.window)
        mask = mask[None, None]
    return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~mask, torch.finfo(query.dtype).min
    )


def _spec_for(module: nn.Module, scaling: float | None, d_head: int, kwargs: dict) -> AttentionSpec:
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = bool(getattr(module, "is_causal", True))
    window = kwargs.get("sliding_window")
    return AttentionSpec(
        causal=bool(causal),
        scaling=float(scaling) if scaling is not None else d_head**-0.5,
        window=int(window) if window else None,
        softcap=kwargs.get("softcap") or None,
        key_valid=_active.key_valid if _active is not None else None,
        sinks=kwargs.get("s_aux"),
    )


def _headvis_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """The registered attention function: the model's own output, plus a capture."""
    spec = _spec_for(module, scaling, query.shape[-1], kwargs)
    if spec.softcap is not None or spec.sinks is not None:
        # SDPA cannot soft-cap or add sinks: use the model's own eager function.
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
        output, _ = eager(
            module, query, key, value, _float_mask(attention_mask, spec, query, key),
            scaling=scaling, dropout=dropout, **kwargs,
        )
    else:
        output, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    session = _active
    if session is not None and query.shape[2] == key.shape[2]:  # self-attention only
        session._on_layer(module, query, key, value, output, spec)
    return output, None


def install() -> None:
    """Register the "headvis" attention and mask functions (idempotent)."""
    AttentionInterface.register(IMPLEMENTATION, _headvis_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)


def layer_index(module: nn.Module) -> int:
    index = getattr(module, "layer_idx", None)
    if not isinstance(index, int):
        raise RuntimeError(f"{type(module).__name__} has no integer layer_idx; headvis cannot tell its layer")
    return index


class CaptureSession:
    """Runs forward passes of `model`, calling `on_layer` for each wanted layer.

    The model must have been loaded (or switched) to the "headvis" attention
    implementation. Layers after the last wanted one are skipped. tp > 1: the model is split over the `tp`
    processes of the process group by heads (--tp), every one runs the same forward passes, and every
    process's `on_layer` gets its own heads, `head_offset` saying which (rank x its head count: the global
    head order of transformers' column-wise split); nothing is gathered here.
    """

    def __init__(self, model: nn.Module, layers: set[int], on_layer: Callable[[LayerCapture], None], tp: int = 1):
        install()
        self.model = model
        self.layers = set(layers)
        self.on_layer = on_layer
        self.tp = tp
        self.key_valid: Tensor | None = None
        self._last = max(self.layers) if self.layers else -1
        # FSDP2 (--tp beside data parallelism) must see each forward end: stopping it inside a wrapped layer
        # would leave that layer's parameters gathered and the root's per-forward state set for the next one
        self._whole_forward = _fsdp_wrapped(model)

    def __enter__(self) -> "CaptureSession":
        global _active
        _lock.acquire()
        self._previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(IMPLEMENTATION)
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        try:
            self.model.set_attn_implementation(self._previous)
        finally:
            _lock.release()

    def _on_layer(self, module, query, key, value, output, spec) -> None:
        index = layer_index(module)
        if index in self.layers:
            if self.tp > 1:
                n_heads = getattr(self.model.config, "num_attention_heads", None)
                if n_heads is not None and query.shape[1] * self.tp != n_heads:
                    raise HeadvisError(f"--tp {self.tp}: transformers' tensor-parallel plan for this model does "
                                       f"not split its attention by heads (a process holds {query.shape[1]} of "
                                       f"{n_heads}); use --device-map auto instead")
                from headvis.distributed import tp_rank

                self.on_layer(LayerCapture(index, module, query, key, value, output, spec,
                                           head_offset=tp_rank() * query.shape[1]))
            else:
                self.on_layer(LayerCapture(index, module, query, key, value, output, spec))
        if index >= self._last and not self._whole_forward:
            raise _StopForward

    def run(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> None:
        """One forward pass over input_ids (batch, pos); padding keys are False in attention_mask."""
        self.key_valid = attention_mask.bool() if attention_mask is not None else None
        try:
            with torch.no_grad() if self._whole_forward else torch.inference_mode():
                self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass


def _fsdp_wrapped(model: nn.Module) -> bool:
    """Whether FSDP2 wraps `model`: under --tp beside data parallelism transformers builds a (dp_replicate, tp)
    mesh and wraps every replica with FSDP2 (a shard group of one process: nothing is sharded or sent between
    replicas). Its forward then runs to the end, under torch.no_grad (FSDP2's unsharding refuses inference
    tensors): the layers after the last scanned one cost their compute (one MLP when every layer is scanned)."""
    config = getattr(getattr(model, "config", None), "distributed_config", None)
    return getattr(config, "dp_size", 1) > 1


@torch.inference_mode()
def run_attention(model: nn.Module, module: nn.Module, hidden_states: Tensor, **kwargs) -> LayerCapture:
    """One attention module of `model` run alone on `hidden_states` (batch, pos, d_model), already normed.

    kwargs go to the module's forward (e.g. `position_embeddings=(cos, sin)` for rotary models). The
    capture is what the module computed: its post-RoPE queries, keys and values. Attributions use it
    to push components of an input through the model's own projections and rotary embedding.
    """
    grabbed: list[LayerCapture] = []
    with CaptureSession(model, {layer_index(module)}, grabbed.append):
        try:
            module(hidden_states=hidden_states, attention_mask=None, **kwargs)
        except _StopForward:
            pass
    if not grabbed:
        raise RuntimeError(f"{type(module).__name__} did not call the attention interface")
    return grabbed[0]
