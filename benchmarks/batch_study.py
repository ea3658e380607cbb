"""Batched generation: sequences per second at batch 1 vs larger batches, SpecKV vs the full cache.

The same prompts (benchmark samples at one length, tasks in turn) are answered greedily once per method
and batch size, in one process: batch size 1 is one ``generate`` call per prompt, batch size ``b`` passes
``b`` prompts at a time to ``generate``. A row records the seconds for all prompts, sequences per second,
the largest ``peak_kv_bytes`` of a call, the mean score, and whether every batched text equals the text of
the prompt's own call (batched matrix products round differently, so a near tie can flip a greedy token;
the row says how many texts differ). Rows go to ``batch.jsonl``, the table to ``batch.md``.

    python -m benchmarks.batch_study --length 1024 --batch-sizes 1 4 --out docs/bench
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

from draft_rag.bench.tasks import TASKS, TaskGenerator
from draft_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET, LoadedModel, load_model

RESULTS_FILE = "batch.jsonl"
SUMMARY_FILE = "batch.md"


def run_batches(engine: Any, prompts: list[str], batch_size: int, max_new_tokens: int) -> tuple[float, list[Any]]:
    """Answer ``prompts`` ``batch_size`` at a time; return the seconds taken and the results in order."""
    results: list[Any] = []
    started = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        group = prompts[first : first + batch_size]
        if batch_size == 1:
            results.append(engine.generate(group[0], max_new_tokens=max_new_tokens))
        else:
            results.extend(engine.generate(group, max_new_tokens=max_new_tokens))
    return time.perf_counter() - started, results


def study_method(
    target: LoadedModel,
    draft: LoadedModel,
    method: str,
    samples: list[Any],
    batch_sizes: list[int],
    budget: int,
    max_new_tokens: int,
) -> list[dict[str, Any]]:
    """One row per batch size for ``method``; batch size 1 (always run first) is the reference text."""
    from draft_rag import SpecKV

    engine = SpecKV(target=target, draft=draft, method=method, budget=budget)
    prompts = [sample.prompt() for sample in samples]
    engine.generate(prompts[0], max_new_tokens=2)  # warm-up: the first call pays one-time setup
    rows: list[dict[str, Any]] = []
    reference: list[str] = []
    for batch_size in sorted(set(batch_sizes) | {1}):
        seconds, results = run_batches(engine, prompts, batch_size, max_new_tokens)
        texts = [result.text for result in results]
        reference = reference or texts
        rows.append({
            "method": method, "batch_size": batch_size, "prompts": len(prompts), "length": samples[0].length,
            "budget": budget if method != "full" else None, "max_new_tokens": max_new_tokens,
            "prompt_tokens": sum(r.prompt_tokens for r in results) / len(results),
            "completion_tokens": sum(r.completion_tokens for r in results),
            "seconds": seconds, "sequences_per_s": len(prompts) / seconds,
            "peak_kv_bytes": max(r.peak_kv_bytes for r in results),
            "score": sum(s.score(t) for s, t in zip(samples, texts, strict=True)) / len(samples),
            "texts_differing": sum(a != b for a, b in zip(texts, reference, strict=True)),
            "dtype": target.dtype_name,
        })
    return rows


def summarize(rows: list[dict[str, Any]]) -> str:
    """A markdown table: per method and batch size, time, sequences/s, speed-up vs batch 1, peak KV, equality."""
    lines = [
        "| method | batch | prompts | prompt tokens | s | seq/s | vs batch 1 | peak KV MiB | score | "
        "texts equal to batch 1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        single = next(r for r in rows if r["method"] == row["method"] and r["batch_size"] == 1)
        equal = row["prompts"] - row["texts_differing"]
        lines.append(
            f"| {row['method']} | {row['batch_size']} | {row['prompts']} | {row['prompt_tokens']:.0f} | "
            f"{row['seconds']:.1f} | {row['sequences_per_s']:.3f} | "
            f"{row['sequences_per_s'] / single['sequences_per_s']:.2f}x | {row['peak_kv_bytes'] / 2**20:.1f} | "
            f"{100 * row['score']:.0f}% | {equal}/{row['prompts']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024, help="prompt tokens of each sample (default 1024)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts answered per row (default 4)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4], help="(default 1 4)")
    parser.add_argument("--methods", nargs="+", default=["speckv", "full"],
                        choices=["speckv", "snapkv", "streamingllm", "full"])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["niah_single", "niah_multikey", "qa"])
    parser.add_argument("--budget", type=int, default=256, help="SpecKV's KV budget per head (default 256)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="(default 32)")
    parser.add_argument("--dtype", default=None, help="models' dtype (default: the loader's choice)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models: plumbing check only")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="(default bench-out)")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.prompts < 1:
        parser.error("--batch-sizes and --prompts must be >= 1")

    import torch

    if args.tiny:
        from draft_rag.bench.tiny import tiny_pair

        draft, target = tiny_pair()
    else:
        target = load_model(DEFAULT_TARGET, dtype=args.dtype)
        draft = load_model(DEFAULT_DRAFT, dtype=args.dtype)
    generator = TaskGenerator(target.tokenizer)
    samples = [generator.sample(args.tasks[i % len(args.tasks)], args.length, i // len(args.tasks))
               for i in range(args.prompts)]
    rows = []
    for method in args.methods:
        for row in study_method(target, draft, method, samples, args.batch_sizes, args.budget, args.max_new_tokens):
            rows.append(row)
            print(f"{method} batch {row['batch_size']}: {row['seconds']:.1f} s, {row['sequences_per_s']:.3f} seq/s, "
                  f"{row['texts_differing']} texts differ from batch 1", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / RESULTS_FILE, "a", encoding="utf-8") as sink:
        for row in rows:
            sink.write(json.dumps(row) + "\n")
    table = "\n".join([
        f"{args.prompts} prompts of ~{args.length} tokens ({', '.join(args.tasks)}), greedy, up to "
        f"{args.max_new_tokens} new tokens; target {target.name}, draft {draft.name}; {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads; one process.",
        "",
        summarize(rows),
    ])
    (args.out / SUMMARY_FILE).write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
