"""Exact QK and OV decompositions of one attention edge into sparse-dictionary feature pairs.

An edge is (layer, head, sequence, query_pos q, key_pos k). On each side the
residual input x at that position is split as

    x = sum_i a_i d_i + b_dec + error,   error = x - decode(encode(x))

(`a_i` the active features, `d_i` their decoder rows), so any dictionary,
trained or not, is exact. `LayerLinearization` pushes every part through the
frozen pre-attention norm, the head's projection and the model's own rotary
embedding; the constant left over (norm shift, projection biases) is the
part `bias`. Kinds of parts: feature, b_dec, error, bias.

QK: the score is bilinear, `s = scaling * q . k`, so it is the sum over every
(query part, key part) pair: an (nq, nk) matrix M of contributions. Its
feature x feature block holds the pairs; the other 15 blocks of kinds are the
named `terms` (feature_x_error, bias_x_feature, ...), and the terms sum to
the pre-softcap score. A soft-capped model (Gemma 2) applies its cap after
the sum; the file says so (`softcap`).

OV: the key position's write through the head at q, `p[q,k] W_O^h v_k`, is
linear in the key-side parts. It is projected onto a target: the
pre-activations (the encoder's linear part, `. W_enc[:, j]`) of a downstream
dictionary's features at q, or without one, the unit direction of the head's
whole output at q. The parts of each target sum to its value.

Only active decoder rows are gathered (n_active x d_model); no d_sae x d_sae
product is ever formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from headvis.attributions.linearize import LayerLinearization, attention_module, pre_attention_norm
from headvis.capture import CaptureSession
from headvis.errors import HeadvisError
from headvis.metrics import allowed_keys
from headvis.models import LoadedModel, output_projections

__all__ = ["KINDS", "Describe", "EdgeInputs", "edge_inputs", "ov_attribution", "qk_attribution"]

KINDS = ("feature", "b_dec", "error", "bias")
TOP_PAIRS = 50  # pairs listed; the rest stay in terms["feature_pairs"]
TOP_MARGINALS = 20  # features listed per side
TOP_INTERACTIONS = 5  # partners listed per marginal
TOP_TARGETS = 16  # OV: downstream target features listed


class DictionaryLike(Protocol):
    name: str
    hook_name: str
    d_sae: int
    W_dec: Tensor  # (d_sae, d_out)
    b_dec: Tensor  # (d_out,)

    def encode(self, x: Tensor) -> Tensor: ...


# feature index -> (description, snippets); the feature library fills them, the default says nothing
Describe = Callable[[str, int], tuple[str, list]]


def _no_description(_dictionary: str, feature: int) -> tuple[str, list]:
    return f"feature {feature}", []


@dataclass
class EdgeInputs:
    """What the model computed for one sequence at one layer: residual input, q/k/v, pattern row."""

    resid: Tensor  # (pos, d_model) the layer's residual input (hook_resid_pre)
    query: Tensor  # (head, pos, d_head) post-RoPE, from the model's own forward
    key: Tensor  # (kv_head, pos, d_head)
    value: Tensor  # (kv_head, pos, d_head)
    output: Tensor  # (pos, head, d_head) pattern @ value
    scores: Tensor  # (head, pos, pos) pre-softmax, after soft-capping; -inf where not allowed
    pattern: Tensor  # (head, pos, pos)
    softcap: float | None


def _decoder_layer(model: nn.Module, attention: nn.Module) -> nn.Module:
    """The block holding `attention`: the ancestor that is an entry of a ModuleList (the model's layers)."""
    parents = {child: parent for parent in model.modules() for child in parent.children()}
    node = attention
    while node in parents:
        parent = parents[node]
        if isinstance(parent, nn.ModuleList):
            return node
        node = parent
    raise HeadvisError(f"cannot find the decoder layer of {type(attention).__name__}")


def edge_inputs(lm: LoadedModel, token_ids: list[int], layer: int) -> EdgeInputs:
    """One forward pass of `token_ids`, stopped after `layer`: its residual input and what its attention computed."""
    ids = torch.tensor([token_ids], dtype=torch.long, device=lm.device)
    grabbed, resid = [], []
    block = _decoder_layer(lm.model, attention_module(lm.model, layer))

    def read_input(_module, args, kwargs):  # the block's input is hook_resid_pre (hidden_states[layer])
        resid.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])[0].detach().float())

    handle = block.register_forward_pre_hook(read_input, with_kwargs=True)
    try:
        with CaptureSession(lm.model, {layer}, grabbed.append) as session:
            session.run(ids)
    finally:
        handle.remove()
    capture = grabbed[0]
    spec = capture.spec
    group = capture.query.shape[1] // capture.key.shape[1]
    q = capture.query[0].double()
    k = capture.key[0].double().repeat_interleave(group, dim=0)
    scores = q @ k.transpose(-1, -2) * spec.scaling  # (head, pos, pos)
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    allowed = allowed_keys(spec, 0, len(token_ids), len(token_ids), scores.device)[0, 0]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return EdgeInputs(resid=resid[0], query=capture.query[0], key=capture.key[0], value=capture.value[0],
                      output=capture.output[0], scores=scores, pattern=torch.softmax(scores, dim=-1),
                      softcap=spec.softcap)


@dataclass
class _Side:
    """One side's residual input split into parts (rows), and those parts through the layer."""

    kinds: list[str]  # KINDS entry per part: features first, then b_dec, error, bias
    features: list[int]  # feature index of each feature part
    activations: list[float]
    projected: dict[str, Tensor]  # query/key/value -> (n_parts, head or kv_head, d_head), bias row last
    spec: object  # the layer's AttentionSpec as the model passes it (scaling, soft-cap)


def _split(model, layer: int, dictionary: DictionaryLike, x: Tensor, position: int) -> _Side:
    acts = dictionary.encode(x.float()[None])[0].detach()  # (d_sae,)
    active = torch.nonzero(acts).flatten()
    feature_parts = acts[active, None].double() * dictionary.W_dec.detach()[active].double()  # (n_active, d_model)
    recon = feature_parts.sum(0) + dictionary.b_dec.double()  # decode(encode(x)): only active rows contribute
    parts = torch.cat([feature_parts, dictionary.b_dec.double()[None], (x.double() - recon)[None]])
    lin = LayerLinearization(model, layer, x, position)
    projected = lin.parts(parts)
    constant = lin.constant()
    projected = {name: torch.cat([value, constant[name]]) for name, value in projected.items()}
    kinds = ["feature"] * len(active) + ["b_dec", "error", "bias"]
    return _Side(kinds, active.tolist(), acts[active].tolist(), projected, lin.spec)


def _check_dictionary(dictionary: DictionaryLike, layer: int, lm: LoadedModel) -> None:
    hook = dictionary.hook_name
    ok = {f"blocks.{layer}.hook_resid_pre"}
    if layer > 0 and pre_attention_norm(lm.model, attention_module(lm.model, layer)) is not None:
        ok.add(f"blocks.{layer - 1}.hook_resid_post")  # the same tensor in a pre-norm model
    if hook not in ok or getattr(dictionary, "is_transcoder", False):
        raise HeadvisError(f"dictionary {dictionary.name!r} reads {hook}; attributions of layer {layer} need a "
                           f"sparse autoencoder of blocks.{layer}.hook_resid_pre (the attention's input)")
    if dictionary.W_dec.shape[1] != lm.info.d_model:
        raise HeadvisError(f"dictionary {dictionary.name!r} has width {dictionary.W_dec.shape[1]}, "
                           f"the model's residual stream {lm.info.d_model}")


def _check_edge(inputs: EdgeInputs, head: int, query_pos: int, key_pos: int) -> None:
    n = inputs.resid.shape[0]
    for name, pos in (("query_pos", query_pos), ("key_pos", key_pos)):
        if not 0 <= pos < n:
            raise HeadvisError(f"{name} {pos} is outside the sequence (0..{n - 1})")
    if not torch.isfinite(inputs.scores[head, query_pos, key_pos]):
        raise HeadvisError(f"key_pos {key_pos} is not a key that query_pos {query_pos} may attend to")


def _blocks(m: Tensor, row_kinds: list[str], col_kinds: list[str]) -> dict[str, float]:
    """Sum of m over every (row kind, column kind) block; feature x feature is 'feature_pairs'."""
    rows = torch.tensor([KINDS.index(k) for k in row_kinds], device=m.device)
    cols = torch.tensor([KINDS.index(k) for k in col_kinds], device=m.device)
    terms = {}
    for a, ka in enumerate(KINDS):
        for b, kb in enumerate(KINDS):
            name = "feature_pairs" if (ka, kb) == ("feature", "feature") else f"{ka}_x_{kb}"
            terms[name] = float(m[rows == a][:, cols == b].sum())
    return terms


def _pairs_and_marginals(m: Tensor, rows: _Side | None, cols: _Side, describe: Describe, row_dict: str | None,
                         col_dict: str, row_features: list[int] | None = None,
                         row_activations: list[float] | None = None) -> dict:
    """pairs, query_marginals (rows), key_marginals (columns) of a contribution matrix m (rows x columns)."""
    row_features = rows.features if rows is not None else row_features
    row_activations = rows.activations if rows is not None else row_activations
    nr, nc = len(row_features), len(cols.features)
    ff = m[:nr, :nc]

    def desc(dictionary, feature):
        if dictionary is None or feature is None:
            return "the head's output direction at the query position", []
        return describe(dictionary, feature)

    pairs = []
    if ff.numel():
        order = torch.argsort(ff.abs().flatten(), descending=True, stable=True)[:TOP_PAIRS]
        for flat in order.tolist():
            i, j = divmod(flat, nc)
            qd, qs = desc(row_dict, row_features[i])
            kd, ks = desc(col_dict, cols.features[j])
            pairs.append({"query_feature": row_features[i], "key_feature": cols.features[j],
                          "attribution": float(ff[i, j]), "query_description": qd, "key_description": kd,
                          "query_snippets": qs, "key_snippets": ks,
                          "query_activation": row_activations[i], "key_activation": cols.activations[j]})

    def marginals(totals: Tensor, features: list[int], partners: Tensor, partner_features: list[int],
                  own_dict, partner_dict) -> list[dict]:
        out = []
        for i in torch.argsort(totals.abs(), descending=True, stable=True)[:TOP_MARGINALS].tolist():
            d, s = desc(own_dict, features[i])
            top = torch.argsort(partners[i].abs(), descending=True, stable=True)[:TOP_INTERACTIONS].tolist()
            out.append({"feature": features[i], "description": d, "snippets": s, "marginal_score": float(totals[i]),
                        "top_interactions": [
                            {"feature": partner_features[j], "description": desc(partner_dict, partner_features[j])[0],
                             "snippets": desc(partner_dict, partner_features[j])[1], "pairwise_score": float(partners[i, j])}
                            for j in top]})
        return out

    return {"pairs": pairs,
            "query_marginals": marginals(m[:nr].sum(1), row_features, ff, cols.features, row_dict, col_dict),
            "key_marginals": marginals(m[:, :nc].sum(0), cols.features, ff.T, row_features, col_dict, row_dict)}


def _header(kind: str, layer: int, head: int, seq_idx, query_pos: int, key_pos: int, dictionary: DictionaryLike) -> dict:
    return {"kind": kind, "layer": layer, "head": head, "seq_idx": seq_idx, "query_pos": query_pos,
            "key_pos": key_pos, "dictionary": {"name": dictionary.name, "hook": dictionary.hook_name,
                                              "d_sae": int(dictionary.d_sae)}}


def qk_attribution(lm: LoadedModel, dictionary: DictionaryLike, token_ids: list[int], seq_idx, layer: int, head: int,
                   query_pos: int, key_pos: int, *, describe: Describe = _no_description,
                   inputs: EdgeInputs | None = None) -> dict:
    """The QK attribution file of CONTRACT section 2 (kind "qk") for one edge."""
    _check_dictionary(dictionary, layer, lm)
    inputs = inputs or edge_inputs(lm, token_ids, layer)
    _check_edge(inputs, head, query_pos, key_pos)
    q_side = _split(lm.model, layer, dictionary, inputs.resid[query_pos], query_pos)
    k_side = _split(lm.model, layer, dictionary, inputs.resid[key_pos], key_pos)
    n_heads, n_kv = q_side.projected["query"].shape[1], k_side.projected["key"].shape[1]
    kv = head // (n_heads // n_kv)
    spec = q_side.spec
    m = (q_side.projected["query"][:, head] @ k_side.projected["key"][:, kv].T) * spec.scaling  # (nq, nk)
    terms = _blocks(m, q_side.kinds, k_side.kinds)
    pre_softcap = float(m.sum())
    total = pre_softcap if spec.softcap is None else spec.softcap * math.tanh(pre_softcap / spec.softcap)
    return {
        **_pairs_and_marginals(m, q_side, k_side, describe, dictionary.name, dictionary.name),
        **_header("qk", layer, head, seq_idx, query_pos, key_pos, dictionary),
        "score": float(inputs.scores[head, query_pos, key_pos]),
        "attention": float(inputs.pattern[head, query_pos, key_pos]),
        "terms": terms,
        "total": total,
        "pre_softcap_total": pre_softcap,
        "softcap": spec.softcap,
        "parts": {"query": _counts(q_side), "key": _counts(k_side)},
    }


def _counts(side: _Side) -> dict:
    return {"active_features": side.kinds.count("feature")}


def ov_attribution(lm: LoadedModel, dictionary: DictionaryLike, token_ids: list[int], seq_idx, layer: int, head: int,
                   query_pos: int, key_pos: int, *, target: DictionaryLike | None = None,
                   target_input: Tensor | None = None, describe: Describe = _no_description,
                   inputs: EdgeInputs | None = None) -> dict:
    """The OV attribution file (kind "ov") for one edge: key-side features (source) onto a target.

    target: a downstream dictionary whose input at query_pos receives the head's write
    (`target_input`: that input, (d_model,), to pick its active features); None: the head's output direction.
    """
    _check_dictionary(dictionary, layer, lm)
    inputs = inputs or edge_inputs(lm, token_ids, layer)
    _check_edge(inputs, head, query_pos, key_pos)
    k_side = _split(lm.model, layer, dictionary, inputs.resid[key_pos], key_pos)
    n_heads, n_kv = inputs.query.shape[0], inputs.key.shape[0]
    kv = head // (n_heads // n_kv)
    d_head = inputs.query.shape[-1]
    w_o = output_projections(lm.model)[layer].detach().double()[:, head * d_head:(head + 1) * d_head]  # (d_model, d_head)
    p = inputs.pattern[head, query_pos, key_pos]
    writes = p * (k_side.projected["value"][:, kv] @ w_o.T)  # (n_parts, d_model): each part's write at q
    if target is not None:
        w_enc = target.W_enc.detach().double()  # (d_model, d_sae)
        per_target = writes @ w_enc  # (n_parts, d_sae): contributions to each target pre-activation
        values = per_target.sum(0)
        acts = target.encode(target_input.float()[None])[0] if target_input is not None else None
        active = torch.nonzero(acts).flatten() if acts is not None else values.new_zeros(0, dtype=torch.long)
        pool = active if active.numel() else torch.arange(values.shape[0], device=values.device)
        chosen = pool[torch.argsort(values[pool].abs(), descending=True, stable=True)[:TOP_TARGETS]]
        m = per_target[:, chosen].T  # (targets, parts)
        row_features = chosen.tolist()
        row_activations = [float(acts[j]) if acts is not None else 0.0 for j in row_features]
        target_desc = {"kind": "dictionary", "name": target.name, "hook": target.hook_name,
                       "features": row_features, "values": [float(values[j]) for j in row_features]}
        row_dict = target.name
        target_columns = w_enc[:, chosen]  # (d_model, targets)
    else:
        out_q = inputs.output[query_pos, head].double() @ w_o.T  # (d_model,) the head's whole write at q
        direction = out_q / out_q.norm().clamp_min(1e-30)
        m = (writes @ direction)[None]  # (1, parts)
        row_features, row_activations = [None], [None]
        target_desc = {"kind": "head_output_direction", "norm": float(out_q.norm())}
        row_dict = None
        target_columns = direction[:, None]  # (d_model, 1)
    kinds = k_side.kinds
    terms = {kind: float(m[:, torch.tensor([k == kind for k in kinds], device=m.device)].sum()) for kind in KINDS}
    terms["feature_pairs"] = terms.pop("feature")
    # the target value recomputed from the model's own value vector: p[q,k] W_O^h v_k onto the target columns
    reference = float(((p * (inputs.value[kv, key_pos].double() @ w_o.T)) @ target_columns).sum())
    body = _pairs_and_marginals(m, None, k_side, describe, row_dict, dictionary.name,
                                row_features=row_features, row_activations=row_activations)
    return {
        **body,
        **_header("ov", layer, head, seq_idx, query_pos, key_pos, dictionary),
        "score": reference,
        "attention": float(p),
        "terms": terms,
        "total": float(m.sum()),
        "target": target_desc,
    }
