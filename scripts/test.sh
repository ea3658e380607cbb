#!/usr/bin/env bash
# Set up from scratch and run the checks: ruff, mypy, then every test (the real-model ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "models,langchain,llama-index,bench,test"
.venv/bin/ruff check .
.venv/bin/mypy draft_rag
.venv/bin/python -m pytest -q --durations=15 "$@"
