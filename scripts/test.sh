#!/usr/bin/env bash
# Set up from scratch and run the checks: ruff, mypy, the docs build, then every test (the real-model ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "models,test"
.venv/bin/ruff check .
.venv/bin/mypy draft_rag benchmarks integrations/langchain/langchain_draft_rag
.venv/bin/mypy --namespace-packages --explicit-package-bases \
    integrations/llama_index/llama_index/postprocessor/draft_rag integrations/llama_index/llama_index/llms/draft_rag
# The docs: a broken link, a missing page or a docstring the API reference cannot read fails --strict
# (never add --quiet: it hides the warnings --strict counts). The site goes to a temporary folder.
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir "$(mktemp -d)"
.venv/bin/python -m pytest -q --durations=15 "$@"
