"""Fixtures of the feature-library tests: a tiny Mistral whose embedding marks one token, the
hand-built dictionary of features_helpers.py, and the library's tables of it over a small corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from headvis.datasets import DEFAULT_DATASET, iter_texts, pack_sequences
from headvis.features import compute_tables
from headvis.models import load_model
from features_helpers import MARK, NUM_SEQS, SEED, SEQ_LEN, hand_dictionary


@pytest.fixture(scope="session")
def tiny_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("mistral")


@pytest.fixture(scope="session")
def corpus(tiny_dir) -> torch.Tensor:
    """(NUM_SEQS, SEQ_LEN) token ids of the default corpus, as the scan packs them."""
    lm = load_model(str(tiny_dir))
    return pack_sequences(iter_texts(DEFAULT_DATASET), lm.tokenizer, SEQ_LEN, NUM_SEQS)


def _isolated_token(corpus: torch.Tensor) -> int:
    """A token occurring 3-6 times, never twice within 16 positions of one sequence."""
    ids, counts = torch.unique(corpus[:, 1:], return_counts=True)
    for token in ids[(counts >= 3) & (counts <= 6)].tolist():
        seq, pos = (corpus == token).nonzero(as_tuple=True)
        close = (seq[:, None] == seq[None, :]) & ((pos[:, None] - pos[None, :]).abs() < 16)
        if int(close.sum()) == len(seq):  # only each occurrence with itself
            return token
    raise AssertionError("the corpus has no isolated token")


@pytest.fixture(scope="session")
def marked(tiny_dir, corpus):
    """(lm, token): the tiny model with MARK added to coordinate 0 of `token`'s embedding row."""
    lm = load_model(str(tiny_dir))
    token = _isolated_token(corpus)
    with torch.no_grad():
        lm.model.get_input_embeddings().weight[token, 0] += MARK
    return lm, token


@pytest.fixture(scope="session")
def hand(marked):
    """(lm, token, dictionary): the marked model, its target token, the hand-built dictionary."""
    lm, token = marked
    return lm, token, hand_dictionary(lm.info.d_model)


@pytest.fixture(scope="session")
def tables(hand, corpus):
    """The library's tables of the hand-built dictionary over `corpus`, in batches of 5."""
    lm, _, d = hand
    return compute_tables(lm, d, corpus, batch_size=5, seed=SEED)
