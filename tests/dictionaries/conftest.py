"""Fixtures for the dictionary tests: hand-written SAELens folders, and one torch thread.

The dictionary tests run many small tensor ops (tiny SAEs, tiny models); on a
shared 2-core machine torch's second thread makes them an order of magnitude
slower, so each test here runs with one thread and restores the setting after.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def write_folder(tmp_path) -> Callable[..., Path]:
    """(cfg, tensors, name="dict") -> a folder holding cfg.json and sae_weights.safetensors as given."""

    def write(cfg: dict | str | None, tensors: dict[str, torch.Tensor] | None, name: str = "dict") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        if cfg is not None:
            text = cfg if isinstance(cfg, str) else json.dumps(cfg)
            (folder / "cfg.json").write_text(text, encoding="utf-8")
        if tensors is not None:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
        return folder

    return write
