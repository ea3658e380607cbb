"""fp32, bf16 and dynamic int8 on this machine: draft prefill, SpecPC compression, target decode, kept spans.

Everything runs in one process, one dtype after another, on the same benchmark sample, so the ratios
between rows are comparable (absolute seconds depend on the machine and its load). Kept-span overlap is
the character Jaccard overlap of each dtype's kept text with fp32's. Writes ``dtype.md`` to ``--out``.

    python -m benchmarks.dtype_study --length 2048 --out docs/bench
"""

from __future__ import annotations

import argparse
import platform
import time
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.cache_study import kept_overlap
from draft_rag.bench.tasks import TaskGenerator
from draft_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET, LoadedModel, cpu_has_bf16, load_model

SUMMARY_FILE = "dtype.md"


def as_dtype(loaded: LoadedModel, dtype: str) -> LoadedModel:
    """``loaded`` (an fp32 model) in ``dtype``: ``"bfloat16"``, or ``"int8"`` (dynamic int8 linear layers)."""
    import copy

    import torch

    if dtype == "int8":
        model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(loaded.model), {torch.nn.Linear}, torch.qint8)
    else:
        model = copy.deepcopy(loaded.model).to(getattr(torch, dtype))
    return LoadedModel(model=model, tokenizer=loaded.tokenizer, name=f"{loaded.name}@{dtype}")


def timed(call: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = call()
    return time.perf_counter() - started, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048, help="prompt tokens of the sample (default 2048)")
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8"])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)

    import torch

    from draft_rag import SpecKV, SpecPC
    from draft_rag.scoring import prefill

    draft32 = load_model(DEFAULT_DRAFT, dtype="float32")
    target32 = load_model(DEFAULT_TARGET, dtype="float32")
    sample = TaskGenerator(draft32.tokenizer, chunk_tokens=256).sample("niah_single", args.length, 0)
    prompt_ids = draft32.tokenizer(sample.prompt(), return_tensors="pt").input_ids
    rows = []
    reference = None
    for dtype in args.dtypes:
        draft = draft32 if dtype == "float32" else as_dtype(draft32, dtype)
        prefill_s, _ = timed(partial(prefill, draft.model, prompt_ids))
        pc = SpecPC(draft=draft, budget=args.budget, progress=False, reading="joint")  # as its committed rows read
        compress_s, result = timed(partial(pc.compress, sample.question, sample.documents))
        spans = [d.spans for d in result.documents]
        reference = reference or spans
        target = target32 if dtype == "float32" else as_dtype(target32, dtype)
        answer = SpecKV(target=target, method="full").generate(
            sample.question, max_new_tokens=args.decode_tokens
        )
        rows.append(
            f"| {dtype} | {prefill_s:.2f} | {compress_s:.2f} | {100 * kept_overlap(reference, spans):.0f}% | "
            f"{'yes' if sample.score(chr(10).join(result.texts)) == 1 else 'no'} | "
            f"{answer.timings['tokens_per_s']:.2f} |"
        )
        print(rows[-1], flush=True)
    table = "\n".join([
        f"Sample: niah_single, {prompt_ids.shape[1]} draft tokens, SpecPC budget {args.budget}; target decode of "
        f"{args.decode_tokens} tokens after the question alone. {platform.machine()}, {torch.get_num_threads()} "
        f"torch threads, native bf16: {'yes' if cpu_has_bf16() else 'no'}; one process, dtypes in turn.",
        "",
        "| dtype | draft prefill s | SpecPC compress s | kept-span overlap with fp32 | needle kept | "
        "target decode tok/s |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / SUMMARY_FILE).write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
