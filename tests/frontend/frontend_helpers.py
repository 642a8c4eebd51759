"""Constants of the browser tests' fixture scan and where things are (conftest.py makes the fixtures)."""

from __future__ import annotations

from pathlib import Path

from browser import CHROMIUM, Site, missing  # noqa: F401 (re-exported to the frontend tests)

DIST = Path(__file__).resolve().parents[2] / "frontend" / "dist"
LAYERS = [1, 3]
HEADS = [0, 1, 4]
SEQ_LEN = 32
NUM_SEQS = 12
PER_INTERVAL = 2  # sequences shown per interval
