"""Constants of the browser tests' fixture scan and where things are (conftest.py makes the fixtures)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DIST = Path(__file__).resolve().parents[2] / "frontend" / "dist"
CHROMIUM = Path("/usr/bin/chromium")
# The network is closed in CI: without these flags chromium waits on refused connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

LAYERS = [1, 3]
HEADS = [0, 1, 4]
SEQ_LEN = 32
NUM_SEQS = 12
PER_INTERVAL = 2  # sequences shown per interval


@dataclass
class Site:
    url: str  # the page, e.g. http://127.0.0.1:40123/
    data: Path  # the data tree it serves (a private copy: tests may change it)


def missing(reason: str, *, module: bool = False) -> None:
    """Skip for want of a prerequisite, with how to get it; under CI (`CI` set, as .ci/run's caller does) the
    prerequisites are installed by .ci/run, so their absence fails instead of passing silently."""
    import os

    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"CI must run the frontend tests, but {reason}")
    pytest.skip(reason, allow_module_level=module)
