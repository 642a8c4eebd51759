"""Residual-stream activations at TransformerLens hook names, read off a Hugging Face model.

SAELens dictionaries name where they read by TransformerLens hooks. On the
Hugging Face models headvis loads (`headvis.models.load_model`), with L the
decoder layer:

    blocks.L.hook_resid_pre   the input of layer L            (== output_hidden_states[L])
    blocks.L.hook_resid_mid   the residual after attention, before the MLP: the input of
                              the pre-MLP norm (Llama, Mistral, Qwen: post_attention_layernorm;
                              Gemma 2/3: pre_feedforward_layernorm, since their
                              post_attention_layernorm normalizes the attention output
                              before the residual add; GPT-2: ln_2; GPT-NeoX with
                              use_parallel_residual=False: post_attention_layernorm)
    blocks.L.hook_resid_post  the output of layer L           (== output_hidden_states[L + 1],
                              except for the last layer, whose hidden_states entry has the
                              final norm applied: this is the layer's own, un-normed output)

GPT-NeoX with a parallel residual (the default) has no point between attention
and the MLP: resid_mid is refused. BERT and RoBERTa are post-norm; the names
follow TransformerLens' BertBlock: resid_mid is resid_pre + attention output
before the attention LayerNorm, resid_post is LayerNorm(resid_mid) + MLP output
before the output LayerNorm, so for them resid_post L is *not* hidden_states[L + 1]
(that is its LayerNorm) and resid_post L != resid_pre L + 1. resid_mid is refused
for model types not listed here; resid_pre and resid_post work for every family.

    acts = capture_hooks(lm.model, ["blocks.5.hook_resid_pre"], input_ids)   # {name: (batch, pos, d_model)}
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import Tensor, nn

from headvis.capture import layer_index
from headvis.errors import HeadvisError

__all__ = ["HOOK_KINDS", "capture_hooks", "decoder_layers", "hook_name", "parse_hook"]

HOOK_KINDS = ("resid_pre", "resid_mid", "resid_post")
_HOOK_RE = re.compile(r"blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post)")

_PRE_MLP_NORM = {  # model_type -> the norm whose input is resid_mid
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gpt_neox"),
                    "post_attention_layernorm"),
    **dict.fromkeys(("gemma2", "gemma3", "gemma3_text"), "pre_feedforward_layernorm"),
    "gpt2": "ln_2",
}
_POST_NORM = ("bert", "roberta")  # TransformerLens' BertBlock names (see the module docstring)


def hook_name(layer: int, kind: str) -> str:
    """(5, "resid_pre") -> "blocks.5.hook_resid_pre"."""
    if kind not in HOOK_KINDS:
        raise HeadvisError(f"hook {kind!r} is not supported (use {', '.join(HOOK_KINDS)})")
    return f"blocks.{layer}.hook_{kind}"


def parse_hook(name: str) -> tuple[int, str]:
    """"blocks.5.hook_resid_pre" -> (5, "resid_pre")."""
    match = _HOOK_RE.fullmatch(name.strip()) if isinstance(name, str) else None
    if match is None:
        raise HeadvisError(f"hook {name!r} is not supported: headvis reads "
                           "blocks.L.hook_resid_pre, blocks.L.hook_resid_mid and blocks.L.hook_resid_post")
    return int(match.group(1)), match.group(2)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks: block i holds the attention with layer_idx i."""
    n_layers = model.config.num_hidden_layers
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) != n_layers:
            continue
        indices = []
        for block in module:
            found = [m for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]
            indices.append(layer_index(found[0]) if found else None)
        if indices == list(range(n_layers)):
            return module
    raise HeadvisError(f"cannot find the {n_layers} transformer blocks of {type(model).__name__}")


def _first_tensor(value) -> Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


class _StopForward(Exception):
    """Raised once every asked hook has fired: the rest of the forward pass is not needed."""


def _site(model: nn.Module, block: nn.Module, kind: str, name: str) -> tuple[nn.Module, str]:
    """(module, "input" | "output"): where `kind` is read in `block`."""
    model_type = model.config.model_type
    if model_type in _POST_NORM and kind != "resid_pre":
        norm = block.attention.output.LayerNorm if kind == "resid_mid" else block.output.LayerNorm
        return norm, "input"
    if kind == "resid_pre":
        return block, "input"
    if kind == "resid_post":
        return block, "output"
    norm_name = _PRE_MLP_NORM.get(model_type)
    if norm_name is None:
        raise HeadvisError(f"{name}: resid_mid is not mapped for model type {model_type!r} "
                           f"(mapped: {', '.join(sorted([*_PRE_MLP_NORM, *_POST_NORM]))})")
    if getattr(block, "use_parallel_residual", False):
        raise HeadvisError(f"{name}: this {model_type} model uses a parallel residual "
                           "(attention and MLP read the same input), so it has no resid_mid")
    return getattr(block, norm_name), "input"


def capture_hooks(model: nn.Module, hooks: list[str], input_ids: Tensor,
                  attention_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Hook name -> (batch, pos, d_model) float32 activations, one forward pass (stopped early).

    `model` is a base model as `load_model` returns it (`lm.model`). The tensors are
    ordinary (not inference-mode) tensors on the model's device.
    """
    parsed = {name: parse_hook(name) for name in hooks}
    blocks = decoder_layers(model)
    for name, (layer, _) in parsed.items():
        if not 0 <= layer < len(blocks):
            raise HeadvisError(f"{name}: layer {layer} is out of range (the model has {len(blocks)} layers)")
    captured: dict[str, Tensor] = {}

    def reader(name: str, where: str) -> Callable:
        def on_input(module, args, kwargs):
            record(args[0] if args else kwargs["hidden_states"])

        def on_output(module, args, output):
            record(_first_tensor(output))

        def record(tensor: Tensor) -> None:
            captured[name] = tensor.detach().to(torch.float32, copy=True)  # later in-place ops cannot reach it
            if len(captured) == len(parsed):
                raise _StopForward

        return on_input if where == "input" else on_output

    handles = []
    try:
        for name, (layer, kind) in parsed.items():
            module, where = _site(model, blocks[layer], kind, name)
            if where == "input":
                handles.append(module.register_forward_pre_hook(reader(name, where), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(reader(name, where)))
        device = next(model.parameters()).device
        with torch.inference_mode():
            try:
                model(input_ids=input_ids.to(device),
                      attention_mask=attention_mask.to(device) if attention_mask is not None else None,
                      use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(parsed) - set(captured))
    if missing:
        raise RuntimeError(f"hooks never fired: {missing}")
    return {name: captured[name].clone() for name in hooks}  # outside inference mode: ordinary tensors
