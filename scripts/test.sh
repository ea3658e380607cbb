#!/usr/bin/env bash
# Set up from scratch and run the checks: ruff, mypy, then every test (the real-model ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "models,test"
.venv/bin/ruff check .
.venv/bin/mypy draft_rag benchmarks integrations/langchain/langchain_draft_rag
.venv/bin/mypy --namespace-packages --explicit-package-bases \
    integrations/llama_index/llama_index/postprocessor/draft_rag integrations/llama_index/llama_index/llms/draft_rag
.venv/bin/python -m pytest -q --durations=15 "$@"
