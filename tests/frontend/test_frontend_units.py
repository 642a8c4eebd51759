"""The frontend's own unit tests (vitest, `frontend/src/lib/*.test.ts`), run by `npm test` when node_modules is installed."""

from __future__ import annotations

import os
import shutil
import subprocess

from frontend_helpers import DIST, missing

FRONTEND = DIST.parent


def test_the_frontend_unit_tests_pass():
    if shutil.which("npm") is None or not (FRONTEND / "node_modules" / ".bin" / "vitest").exists():
        missing("frontend/node_modules is not installed: run scripts/setup.sh (or cd frontend && npm ci)")
    result = subprocess.run(["npm", "test", "--silent", "--", "--reporter=dot"], cwd=FRONTEND, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "NO_COLOR": "1", "CI": "1"})
    assert result.returncode == 0, f"npm test failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert " passed" in result.stdout, result.stdout[-2000:]
