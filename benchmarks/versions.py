"""Checkouts measured side by side: `--version NAME=DIR` arguments, their environment, and result files.

DIR goes first on PYTHONPATH of the measured processes, so `headvis` is imported from there: the checkout
itself (`.`), or a folder holding an older checkout's package (headvis/ with server/ and kernels/ copied in
as headvis/server and headvis/kernels).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

__all__ = ["RESULTS", "add_version_argument", "environment", "parse_versions", "write_results"]

RESULTS = Path(__file__).resolve().parent / "results"


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="append", required=True, metavar="NAME=DIR",
                        help="a headvis to measure: DIR goes first on PYTHONPATH (repeatable)")


def parse_versions(specs: list[str]) -> list[tuple[str, Path]]:
    """["before=/tmp/pkg", "after=."] -> [(name, folder)]; SystemExit with a message for a bad one."""
    versions = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder or not (Path(folder) / "headvis" / "__init__.py").is_file():
            raise SystemExit(f"--version {spec!r}: want NAME=DIR, DIR holding headvis/__init__.py")
        versions.append((name, Path(folder).resolve()))
    return versions


def environment(folder: Path) -> dict[str, str]:
    """The environment of a measured process: offline, `folder` first on PYTHONPATH."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(folder).resolve())}


def write_results(stem: str, data, markdown: str) -> None:
    """benchmarks/results/{stem}.json and .md."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=1))
    (RESULTS / f"{stem}.md").write_text(markdown)
