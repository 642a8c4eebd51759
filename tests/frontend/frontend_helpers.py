"""Constants of the browser tests' fixture scans and where things are (conftest.py makes the fixtures), and the
polling the tests share."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from browser import CHROMIUM, Site, missing  # noqa: F401 (re-exported to the frontend tests)

DIST = Path(__file__).resolve().parents[2] / "frontend" / "dist"
LAYERS = [1, 3]
HEADS = [0, 1, 4]
SEQ_LEN = 32
NUM_SEQS = 12
PER_INTERVAL = 2  # sequences shown per interval

# the long scan (`long_scan`): sequences taller than the viewport, a heatmap wider than its canvas
LONG_LAYERS = [1]
LONG_HEADS = [0, 4]
LONG_SEQ_LEN = 1024
LONG_NUM_SEQS = 3
LONG_PER_INTERVAL = 1

POLL_MS = 50  # between two tries of `eventually`

T = TypeVar("T")


def eventually(page, check: Callable[[], T], timeout_ms: float = 10_000) -> T:
    """check()'s value once it stops raising AssertionError, tried every POLL_MS of the page's clock until
    timeout_ms, then its last failure: for a comparison of values read from the page after an event (the page
    redraws on its own schedule; Playwright's expect waits on one locator's state, not on a computed comparison)."""
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
        page.wait_for_timeout(POLL_MS)


def playwright_expect():
    """Playwright's `expect`; the calling test module is skipped, saying why, when Playwright is missing."""
    try:
        import playwright.sync_api as api
    except ImportError:
        missing("Playwright is not installed: pip install -e '.[dev]'", module=True)
    return api.expect


def read_json(path: Path):
    import json

    return json.loads(path.read_text())
