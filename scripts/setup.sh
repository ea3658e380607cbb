#!/usr/bin/env bash
# Create .venv (if missing) and install draft-rag with the given extras (default: the offline demo's).
# torch is pinned to the CPU build this machine type provides; any other torch spec pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-models,examples}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[${extras}]"
