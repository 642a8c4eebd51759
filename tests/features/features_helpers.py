"""Constants and the hand-built dictionary of the feature-library tests (fixtures: conftest.py).

Mistral has no position embedding, so blocks.0.hook_resid_pre is the token embedding itself:
adding MARK to coordinate 0 of the target token's embedding row makes feature 0 (encoder column
e_0, bias -MARK / 2) fire on that token and nowhere else (every other row has |x_0| ~ 0.02).
"""

from __future__ import annotations

from pathlib import Path

import torch

from headvis.dictionaries import Dictionary

SEQ_LEN = 32
NUM_SEQS = 24
MARK = 10.0
TOKEN_FEATURE, DEAD_FEATURE = 0, 1
D_SAE = 6
SEED = 3  # of the interval samples in `tables`


def hand_dictionary(d_in: int, *, d_sae: int = D_SAE, seed: int = 0, name: str = "hand",
                    hook_name: str = "blocks.0.hook_resid_pre") -> Dictionary:
    """Feature 0 reads coordinate 0 (bias -MARK / 2), feature 1 is dead, the rest are random ReLU features."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d_in, d_sae, generator=g) * 30.0  # x ~ 0.02 per coordinate: pre-activations ~ 3
    b_enc = torch.zeros(d_sae)
    W_enc[0, :] = 0.0  # only feature 0 reads the marked coordinate
    W_enc[:, TOKEN_FEATURE] = 0.0
    W_enc[0, TOKEN_FEATURE] = 1.0
    b_enc[TOKEN_FEATURE] = -MARK / 2
    W_enc[:, DEAD_FEATURE] = 0.0
    b_enc[DEAD_FEATURE] = -1.0
    layer = int(hook_name.split(".")[1])
    return Dictionary(name=name, path=Path(name), architecture="standard", hook_name=hook_name, hook_name_out=None,
                      layer=layer, hook=hook_name.rsplit("hook_", 1)[1], d_in=d_in, d_sae=d_sae, d_out=d_in,
                      W_enc=W_enc, b_enc=b_enc, W_dec=W_enc.T.contiguous(), b_dec=torch.zeros(d_in), threshold=None,
                      k=None, apply_b_dec_to_input=False, model_name=None, is_transcoder=False)
