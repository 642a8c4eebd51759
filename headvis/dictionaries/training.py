"""Training a TopK sparse autoencoder on a stream of activations (Gao et al. 2024, "Scaling and
evaluating sparse autoencoders"; SAELens' TopKTrainingSAE).

    pre   = (x - b_dec) @ W_enc + b_enc          # x: (batch, d_in), scaled to unit mean norm
    acts  = relu(topk(pre, k))                    # (batch, d_sae), k non-zeros at most
    recon = acts @ W_dec + b_dec                  # decoded as a k-sparse sum (embedding_bag)
    loss  = |x - recon|^2 + AUX_COEF * |e - e_aux|^2,   e = x - recon (detached)

- AuxK: latents that fired on none of the last `dead_tokens` training tokens are
  dead; the top `aux_k` pre-activations among them (raw values, as SAELens, so a
  latent with negative pre-activations still learns) reconstruct the error e
  (e_aux = aux_acts @ W_dec, no bias), which pulls dead latents back into use.
- W_dec rows stay unit norm: the gradient component along each row is projected
  out before the Adam step and the rows are renormalized after it. W_enc starts as
  W_dec^T, b_dec at the geometric median of the first tokens.
- Input scale: 1 / mean |x| over the first tokens. The returned weights have it
  folded in so they read raw activations (b_enc and b_dec divided by the scale,
  W_enc and the unit W_dec rows unchanged; feature activations come out in the
  raw units of the residual stream).
- Learning rate: linear warm-up over the first WARMUP_FRACTION of the steps,
  constant, then linear decay to 0 over the last DECAY_FRACTION; gradient norm clipped to 1.

Cost per step of B tokens: two dense (B, d_in) x (d_in, d_sae) products (the
encoder and its weight gradient); the k-sparse decode is B * k * d_in.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headvis.dictionaries.dictionary import Dictionary
from headvis.dictionaries.hooks import parse_hook

__all__ = ["AUX_COEF", "TopKConfig", "TopKResult", "evaluate", "geometric_median", "shuffled_batches",
           "to_dictionary", "train_topk"]

AUX_COEF = 1 / 32  # the paper's alpha
WARMUP_FRACTION = 0.05
DECAY_FRACTION = 0.2
INIT_TOKENS = 4096  # tokens that set the input scale and b_dec's initial value
_CLIP_NORM = 1.0


@dataclass(frozen=True)
class TopKConfig:
    d_in: int
    d_sae: int
    k: int  # latents kept per token
    steps: int  # optimizer steps (sets the learning-rate schedule)
    lr: float
    dead_tokens: int  # a latent silent for this many training tokens is dead (AuxK)
    aux_k: int | None = None  # dead latents AuxK uses per token; None: d_in // 2 (the paper's heuristic)


@dataclass
class TopKResult:
    """Weights that read raw activations, and how training went."""

    W_enc: Tensor  # (d_in, d_sae)
    b_enc: Tensor  # (d_sae,)
    W_dec: Tensor  # (d_sae, d_in), unit rows
    b_dec: Tensor  # (d_in,)
    scale: float  # the input scale folded into the weights (1 / mean |x|)
    steps: int  # optimizer steps taken (fewer than cfg.steps only if `batches` ran out)
    tokens: int  # training tokens seen (with repeats)
    dead_fraction: float  # latents silent for the last `dead_tokens` training tokens


def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """(n, d) -> (d,): Weiszfeld's iteration from the mean."""
    median = points.mean(dim=0)
    for _ in range(iters):
        weights = 1.0 / (points - median).norm(dim=-1).clamp_min(1e-8)  # (n,)
        updated = (weights[:, None] * points).sum(dim=0) / weights.sum()
        moved = (updated - median).norm()
        median = updated
        if moved <= tol * median.norm().clamp_min(1e-8):
            break
    return median


def shuffled_batches(chunks: Callable[[int], Iterable[Tensor]], total: int, capacity: int, batch: int,
                     generator: torch.Generator) -> Iterator[Tensor]:
    """Endless (batch, d) batches drawn from `chunks(epoch)`, a stream of (n, d) tensors of `total` rows.

    A stream that fits in `capacity` rows is read once and reshuffled each epoch; a
    longer one is read again each epoch through a mixing buffer of `capacity` rows
    (fill, shuffle, hand out half, refill).
    """
    if total <= capacity:
        every = torch.cat(list(chunks(0)))  # (total, d)
        while True:
            order = torch.randperm(len(every), generator=generator)
            for start in range(0, len(order) - batch + 1, batch):
                yield every[order[start:start + batch]]
    for epoch in itertools.count():
        held: list[Tensor] = []
        n_held = 0
        for chunk in chunks(epoch):
            held.append(chunk)
            n_held += len(chunk)
            if n_held >= capacity:
                pool = torch.cat(held)
                pool = pool[torch.randperm(len(pool), generator=generator)]
                keep = len(pool) // 2
                for start in range(keep, len(pool) - batch + 1, batch):
                    yield pool[start:start + batch]
                rest = (len(pool) - keep) % batch  # rows of the handed-out half that made no full batch
                held = [pool[:keep], pool[len(pool) - rest:]] if rest else [pool[:keep]]
                n_held = keep + rest
        if held:
            pool = torch.cat(held)
            pool = pool[torch.randperm(len(pool), generator=generator)]
            for start in range(0, len(pool) - batch + 1, batch):
                yield pool[start:start + batch]


class _TopKSAE(nn.Module):
    def __init__(self, cfg: TopKConfig, b_dec: Tensor, generator: torch.Generator):
        super().__init__()
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=generator)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)  # (d_sae, d_in), unit rows
        self.W_enc = nn.Parameter(W_dec.T.clone())  # (d_in, d_sae)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(b_dec.clone())
        self.k = cfg.k

    def pre(self, x: Tensor) -> Tensor:
        # (x - b_dec) @ W_enc without forming (batch, d_in) gradients for b_dec
        return x @ self.W_enc + (self.b_enc - self.b_dec @ self.W_enc)  # (batch, d_sae)

    def sparse_decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """(batch, n) values at (batch, n) latent indices -> (batch, d_in), without the bias."""
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Drop the gradient component along each (unit) decoder row: it would only change its norm."""
        grad = self.W_dec.grad
        grad -= (grad * self.W_dec).sum(dim=-1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True)


def _lr_factor(step: int, steps: int) -> float:
    warmup = max(1, round(WARMUP_FRACTION * steps))
    decay = max(1, round(DECAY_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    return min(1.0, (steps - step) / decay)


def train_topk(batches: Iterator[Tensor], cfg: TopKConfig, *, seed: int = 0, device: str | torch.device = "cpu",
               progress: Callable[[dict], None] | None = None) -> TopKResult:
    """Train on `cfg.steps` batches of raw (batch, d_in) activations from `batches`; weights come back on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    first: list[Tensor] = []
    for batch in batches:
        first.append(batch)
        if sum(len(b) for b in first) >= INIT_TOKENS or len(first) >= cfg.steps:
            break
    if not first:
        raise ValueError("train_topk: no training batches")
    sample = torch.cat(first).to(torch.float32)  # (>= INIT_TOKENS, d_in) unless the run is shorter
    scale = 1.0 / sample.norm(dim=-1).mean().clamp_min(1e-12).item()
    sae = _TopKSAE(cfg, geometric_median(sample * scale), generator).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, cfg.steps))
    aux_k = min(cfg.aux_k or cfg.d_in // 2, cfg.d_sae)
    silent = torch.zeros(cfg.d_sae, dtype=torch.int64, device=device)  # training tokens since each latent fired
    steps = tokens = 0
    for step, x in enumerate(itertools.islice(itertools.chain(first, batches), cfg.steps)):
        x = x.to(device, torch.float32) * scale  # (batch, d_in)
        pre = sae.pre(x)
        values, indices = pre.topk(cfg.k, dim=-1, sorted=False)  # (batch, k)
        values = values.relu()
        recon = sae.sparse_decode(values, indices) + sae.b_dec
        mse = (recon - x).pow(2).sum(dim=-1).mean()
        loss = mse
        dead = silent >= cfg.dead_tokens
        n_dead = int(dead.sum())
        aux = torch.zeros((), device=device)
        if n_dead:
            dead_pre = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
            aux_values, aux_indices = dead_pre.topk(min(aux_k, n_dead), dim=-1, sorted=False)
            error = (x - recon).detach()
            aux = (sae.sparse_decode(aux_values, aux_indices) - error).pow(2).sum(dim=-1).mean()
            loss = loss + AUX_COEF * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.project_decoder_grad()
        nn.utils.clip_grad_norm_(sae.parameters(), _CLIP_NORM)
        optimizer.step()
        schedule.step()
        sae.normalize_decoder()

        with torch.no_grad():
            fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=device)
            fired[indices[values > 0]] = True
            silent += len(x)
            silent[fired] = 0
        steps, tokens = steps + 1, tokens + len(x)
        if progress is not None:  # mse and aux per token, in scaled units
            progress({"step": step, "mse": mse.item(), "aux": aux.item(), "dead": n_dead / cfg.d_sae})

    with torch.no_grad():
        return TopKResult(
            W_enc=sae.W_enc.detach().cpu().clone(),
            b_enc=sae.b_enc.detach().cpu() / scale,
            W_dec=sae.W_dec.detach().cpu().clone(),
            b_dec=sae.b_dec.detach().cpu() / scale,
            scale=scale,
            steps=steps,
            tokens=tokens,
            dead_fraction=float((silent >= cfg.dead_tokens).float().mean()),
        )


def to_dictionary(result: TopKResult, k: int, *, path: Path, hook_name: str, model_name: str | None,
                  metadata: dict | None = None) -> Dictionary:
    """The trained weights as a topk SAE Dictionary that reads raw activations."""
    layer, hook = parse_hook(hook_name)
    d_sae, d_in = result.W_dec.shape
    return Dictionary(
        name=path.name, path=path, architecture="topk", hook_name=hook_name, hook_name_out=None,
        layer=layer, hook=hook, d_in=d_in, d_sae=d_sae, d_out=d_in,
        W_enc=result.W_enc, b_enc=result.b_enc, W_dec=result.W_dec, b_dec=result.b_dec,
        threshold=None, k=k, apply_b_dec_to_input=True, model_name=model_name, is_transcoder=False,
        metadata=dict(metadata or {}),
    )


@torch.no_grad()
def evaluate(d: Dictionary, x: Tensor, chunk: int = 4096) -> dict[str, float]:
    """Reconstruction of (n, d_in) activations x: fvu, mse (per token) and l0 (mean active latents).

    FVU = sum |x - recon|^2 / sum |x - mean(x)|^2, over all n tokens.
    """
    x = x.to(torch.float32)
    mean = x.mean(dim=0)
    error = total = active = 0.0
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk]
        acts = d.encode(part)
        error += (d.decode(acts) - part).pow(2).sum().item()
        total += (part - mean).pow(2).sum().item()
        active += (acts != 0).sum().item()
    return {"fvu": error / max(total, 1e-30), "mse": error / len(x), "l0": active / len(x)}
