#!/usr/bin/env bash
# The GPU checks in one go, for a CUDA machine such as one H100 (about 7 minutes at most). It installs nothing and
# reaches no network: it needs python3 with a CUDA build of torch, transformers, tokenizers, numpy, tqdm,
# safetensors, accelerate, pytest and pytest-timeout, and runs from the repository root:
#
#   OUT=/tmp/gpu bash benchmarks/gpu_run.sh
#
# Each step has its own time limit (sent as Ctrl-C, so pytest still prints its counts), so that a slow step cannot
# eat the others' time:
#   1. tests/test_cuda.py in bf16: no host waits in the hot loops, the compiled FlexAttention kernel against the
#      dense reference, observer scores without fp32 copies, sampling on the device;
#   2. the GPU study (benchmarks/gpu_study.py): $OUT/gpu.jsonl and $OUT/gpu.md, with the GPU's name;
#   3. the tiny-model tests of the core on CUDA, in bf16 and then in fp16 (tests/tiny.py moves every model there:
#      tests that build their inputs on the CPU or compare with fp32 tolerances are expected to fail there; the
#      counts say how much of the suite holds on the device).
# STUDY_ARGS adds arguments to the study (e.g. "--targets qwen2.5-7b-instruct" for a shorter run, or "--smoke" to
# try this script on a machine without a GPU, where the CUDA steps then fail or skip).
# $OUT receives 8 files: summary.txt (environment and one line per step), cuda-checks.txt, study.txt, gpu.jsonl,
# gpu.md, tiny-bfloat16.txt, tiny-float16.txt and nvidia-smi.txt.
set -u
OUT="${OUT:-gpu-out}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
summary="$OUT/summary.txt"

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__,
'|', torch.cuda.get_device_name(), '| bf16', torch.cuda.is_bf16_supported())" > "$summary" 2>&1

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, its output in $OUT/NAME.txt
  local name=$1 seconds=$2
  shift 2
  local started=$SECONDS
  timeout -s INT -k 15 "$seconds" "$@" > "$OUT/$name.txt" 2>&1
  local status=$?
  echo "$name: exit $status after $((SECONDS - started)) s: $(grep -v '^$' "$OUT/$name.txt" | tail -n 1)" >> "$summary"
}

# The tiny-model tests on CUDA: tests/tiny.py reads the dtype from DRAFT_RAG_TEST_DTYPE.
PYTEST=("$PYTHON" -m pytest -q -rfE -p no:cacheprovider -m "not real_model" -o timeout=120)

CORE_TESTS=(tests/test_scoring.py tests/test_sparse_prefill.py tests/test_host_syncs.py tests/test_draft_pass.py
            tests/test_speckv.py tests/test_speckv_batch.py tests/test_speckv_methods.py tests/test_speckv_sparse.py
            tests/test_specpc.py tests/test_cascade.py tests/test_draft_cache.py)

step cuda-checks 120 env DRAFT_RAG_TEST_DTYPE=bfloat16 "${PYTEST[@]}" tests/test_cuda.py
# shellcheck disable=SC2086  # STUDY_ARGS is a list of words
step study 210 "$PYTHON" -m benchmarks.gpu_study --out "$OUT" ${STUDY_ARGS:-}
for dtype in bfloat16 float16; do
  step "tiny-$dtype" 50 env DRAFT_RAG_TEST_DEVICE=cuda DRAFT_RAG_TEST_DTYPE=$dtype "${PYTEST[@]}" "${CORE_TESTS[@]}"
done
cat "$summary"
