"""One attention layer as a linear map of its residual input, frozen at a real input.

A head's query at position q is `rope_q(W_Q norm(x_q) + b_Q)`. The
pre-attention norm is linear once its scale is frozen at its value on the
real input x_q (RMSNorm: gamma / rms(x_q); LayerNorm: centering, then
gamma / std(x_q), plus beta), and the rotary embedding is linear at a fixed
position, so any split of x_q into parts c_i (sum c_i = x_q) gives a split
of the query into `rope_q(W_Q share(c_i))` plus one constant part
`rope_q(W_Q beta + b_Q)`, and the same for keys and values. The parts are
computed by the model's own modules (a float64 copy of the layer's attention
module, run through `headvis.capture.run_attention`, with the model's own
rotary embedding at the true position id), so no family's weight layout is
written out here: GQA, fused QKV (GPT-2's Conv1D, GPT-NeoX), partial rotary
and projection biases come with the module.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from headvis.capture import layer_index, run_attention
from headvis.errors import HeadvisError

__all__ = ["LayerLinearization", "attention_module", "pre_attention_norm"]

_NORM_NAMES = ("input_layernorm", "ln_1")  # the pre-attention norm of a decoder layer (Llama/NeoX/Gemma, GPT-2)
# attention module -> its float64 copy, made once (a deep copy of one layer costs ~10 ms; an edge needs two)
_FLOAT64: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def _float64(module: nn.Module) -> nn.Module:
    copied = _FLOAT64.get(module)
    if copied is None:
        copied = _FLOAT64[module] = copy.deepcopy(module).double()
    return copied


def attention_module(model: nn.Module, layer: int) -> nn.Module:
    """The self-attention module of `layer` (the one that calls the attention interface)."""
    for module in model.modules():
        if getattr(module, "is_cross_attention", False):
            continue
        if type(module).__name__.endswith(("Attention", "SelfAttention")) and getattr(module, "layer_idx", None) == layer:
            if any(hasattr(module, n) for n in ("q_proj", "c_attn", "query_key_value", "query")):
                return module
    raise HeadvisError(f"no self-attention module with layer_idx {layer} in {type(model).__name__}")


def pre_attention_norm(model: nn.Module, attention: nn.Module) -> nn.Module | None:
    """The norm applied to the residual stream before `attention`; None for post-norm models (BERT)."""
    parents = {child: parent for parent in model.modules() for child in parent.children()}
    node = attention
    for _ in range(3):  # the attention module, its wrapper (BERT), the decoder layer
        node = parents.get(node)
        if node is None:
            return None
        for name in _NORM_NAMES:
            norm = getattr(node, name, None)
            if isinstance(norm, nn.Module):
                return norm
    return None


@dataclass
class _FrozenNorm:
    """norm(x) = scale * center(x) + shift on this input; `center` removes the mean for LayerNorm."""

    scale: Tensor  # (d_model,) float64
    shift: Tensor  # (d_model,) float64: LayerNorm's beta, else 0
    center: bool

    def share(self, parts: Tensor) -> Tensor:
        """(n, d_model) parts of the input -> their parts of the normed input (the shift excluded)."""
        if self.center:
            parts = parts - parts.mean(-1, keepdim=True)
        return parts * self.scale


def _freeze(norm: nn.Module | None, x: Tensor) -> _FrozenNorm:
    """The norm linearized at the real input x (d_model,), checked against the norm's own output."""
    x64 = x.double()
    d_model = x.shape[-1]
    f64 = dict(dtype=torch.float64, device=x.device)
    if norm is None:
        return _FrozenNorm(torch.ones(d_model, **f64), torch.zeros(d_model, **f64), False)
    weight = getattr(norm, "weight", None)
    weight = torch.ones(d_model, **f64) if weight is None else weight.detach().double()
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    with torch.inference_mode():
        want = norm(x[None]).double()[0]
    if isinstance(norm, nn.LayerNorm) or "LayerNorm" in type(norm).__name__:
        bias = getattr(norm, "bias", None)
        shift = torch.zeros(d_model, **f64) if bias is None else bias.detach().double()
        std = torch.sqrt(x64.var(unbiased=False) + eps)
        candidates = [_FrozenNorm(weight / std, shift, True)]
    else:  # RMSNorm: gamma * x / rms(x); Gemma's RMSNorm scales by (1 + gamma)
        rms = torch.sqrt((x64 * x64).mean() + eps)
        zero = torch.zeros(d_model, **f64)
        candidates = [_FrozenNorm(weight / rms, zero, False), _FrozenNorm((1.0 + weight) / rms, zero, False)]
    for frozen in candidates:
        got = frozen.share(x64[None])[0] + frozen.shift
        if torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())):
            return frozen
    raise HeadvisError(f"cannot linearize {type(norm).__name__}: it is neither an RMSNorm nor a LayerNorm")


class LayerLinearization:
    """The attention of one layer as a linear function of residual-stream parts at one position.

    Built once per (sequence, position, side) from the real residual input x
    at that position. `parts(c)` maps parts c (n, d_model) that sum to x, to
    their query, key and value parts; `constant()` is the part no input
    carries (the norm's shift and the projection biases, through the rotary
    embedding). Everything is float64.
    """

    def __init__(self, model: nn.Module, layer: int, x: Tensor, position: int):
        self.model = model
        self.module = attention_module(model, layer)
        self.norm = _freeze(pre_attention_norm(model, self.module), x)
        self.position = position
        self._module64 = _float64(self.module)
        self._zero = self._project(torch.zeros(1, x.shape[-1], dtype=torch.float64, device=x.device))

    def _rotary(self, n: int) -> dict:
        rotary = getattr(self.model, "rotary_emb", None)
        if rotary is None:  # learned or absolute positions live in the residual stream already
            return {}
        device = self.norm.scale.device
        ids = torch.full((1, 1), self.position, dtype=torch.long, device=device)
        probe = torch.zeros(1, 1, 1, dtype=torch.float64, device=device)
        with torch.inference_mode():
            cos, sin = rotary(probe, ids)
        return {"position_embeddings": (cos.double(), sin.double())}

    def _project(self, normed: Tensor) -> dict[str, Tensor]:
        """{query: (n, head, d_head), key, value: (n, kv_head, d_head)} of normed inputs (n, d_model)."""
        capture = run_attention(self.model, self._module64, normed[:, None, :], **self._rotary(normed.shape[0]))
        self.spec = capture.spec  # the model's own scaling and soft-cap, as it passes them to attention
        return {"query": capture.query[:, :, 0].double(), "key": capture.key[:, :, 0].double(),
                "value": capture.value[:, :, 0].double()}

    def parts(self, parts: Tensor) -> dict[str, Tensor]:
        """Query/key/value parts of residual parts (n, d_model): linear, no bias."""
        projected = self._project(self.norm.share(parts.double()))
        return {name: value - self._zero[name] for name, value in projected.items()}

    def constant(self) -> dict[str, Tensor]:
        """The part of the query/key/value that no input part carries: (1, head or kv_head, d_head) each."""
        return self._project(self.norm.shift[None])

    @property
    def layer(self) -> int:
        return layer_index(self.module)
