"""One op, one room: `kernels/` holds the row-statistics op whole and imports nothing of the scanner."""

from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
    return names


def test_the_kernels_import_only_their_own_package_of_headvis():
    files = sorted(KERNELS.glob("*.py"))
    assert {p.name for p in files} >= {"row_stats_ref.py", "row_stats.py", "row_stats_cpu.py"}
    against = {p.name: [n for n in _imports(p) if n.split(".")[0] == "headvis" and not n.startswith("headvis.kernels")]
               for p in files}
    assert not any(against.values()), f"imports against the layering: {against}"


def test_the_scanner_sees_the_ops_own_types():
    import headvis.metrics as metrics
    from headvis.kernels import row_stats_ref

    for name in metrics.__all__:
        assert getattr(metrics, name) is getattr(row_stats_ref, name), name
