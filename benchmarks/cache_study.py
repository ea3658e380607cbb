"""What the draft cache saves: SpecPC compression time and kept answers, with and without a :class:`DraftCache`.

For each benchmark sample the same compression runs three times in one process: without a cache, with an
empty cache (the first query over these documents: every chunk is encoded on its own, then the question
runs over the cache) and again with the now warm cache (a later query: only the question and the template's
end run through the draft). A row records the three times, whether each compressed text still holds every
gold answer, and how much of the uncached kept text the cached path kept (character overlap). Rows are
appended to a JSON-lines file as they are made and a rerun skips the samples already there.

    python -m benchmarks.cache_study --lengths 2048 4096 8192 --samples 2 --out docs/bench
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.study import StudyLog, add_model_options, mean
from draft_rag.bench.tasks import TASKS, TaskGenerator
from draft_rag.models import load_model

RESULTS_FILE = "draft_cache.jsonl"
SUMMARY_FILE = "draft_cache.md"


def kept_overlap(reference: Sequence[Sequence[tuple[int, int]]], other: Sequence[Sequence[tuple[int, int]]]) -> float:
    """Jaccard overlap of the kept source characters of two compressions of the same documents (1.0: same)."""
    def characters(spans_per_doc: Sequence[Sequence[tuple[int, int]]]) -> set[tuple[int, int]]:
        return {(doc, i) for doc, spans in enumerate(spans_per_doc) for start, end in spans for i in range(start, end)}

    a, b = characters(reference), characters(other)
    return len(a & b) / len(a | b) if a | b else 1.0


def study_sample(draft: Any, tokenizer: Any, sample: Any, budget: int) -> dict[str, Any]:
    """One row: uncached, cold-cache and warm-cache compressions of ``sample`` at ``budget``."""
    from draft_rag import DraftCache, SpecPC

    def run(pc: SpecPC) -> tuple[float, Any]:
        started = time.perf_counter()
        result = pc.compress(sample.question, sample.documents)
        return time.perf_counter() - started, result

    # The same observers with and without the cache (SpecPC's "auto" would switch them), so only the cache differs:
    # the joint prefill against its documents read apart over the cache.
    settings: dict[str, Any] = {"draft": draft, "budget": budget, "target_tokenizer": tokenizer, "progress": False,
                                "observe_from": "window"}
    uncached_s, uncached = run(SpecPC(**settings, reading="joint"))
    cache = DraftCache()
    cached_pc = SpecPC(**settings, cache=cache)
    cold_s, cold = run(cached_pc)
    warm_s, warm = run(cached_pc)

    def kept_answer(result: Any) -> float:
        return sample.score("\n".join(result.texts))

    return {
        "task": sample.task, "length": sample.length, "sample_id": sample.sample_id, "budget": budget,
        "dtype": draft.dtype_name,
        "context_tokens": uncached.total_original_tokens, "documents": len(sample.documents),
        "uncached_s": uncached_s, "cold_s": cold_s, "warm_s": warm_s,
        "kept_uncached": kept_answer(uncached), "kept_cached": kept_answer(warm),
        "overlap": kept_overlap([d.spans for d in uncached.documents], [d.spans for d in warm.documents]),
        "cache_bytes": cache.stats.bytes, "cache_tokens": cache.stats.tokens,
    }


def summarize(rows: list[dict[str, Any]]) -> str:
    """A markdown table per length: times (mean), warm/uncached ratio, answers kept, overlap, bytes per token."""
    lines = [
        "| length | docs | n | uncached s | cold cache s | warm cache s | warm / uncached | answer kept uncached | "
        "answer kept cached | kept-text overlap | bytes / token |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for length in sorted({r["length"] for r in rows}):
        group = [r for r in rows if r["length"] == length]
        per_token = sum(r["cache_bytes"] for r in group) / max(sum(r["cache_tokens"] for r in group), 1)
        lines.append(
            f"| {length} | {mean(group, 'documents'):.0f} | {len(group)} | {mean(group, 'uncached_s'):.1f} | "
            f"{mean(group, 'cold_s'):.1f} | {mean(group, 'warm_s'):.2f} | "
            f"{mean(group, 'warm_s') / mean(group, 'uncached_s'):.3f} | {100 * mean(group, 'kept_uncached'):.0f}% | "
            f"{100 * mean(group, 'kept_cached'):.0f}% | {100 * mean(group, 'overlap'):.0f}% | {per_token:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["niah_single", "niah_multikey", "qa"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    parser.add_argument("--samples", type=int, default=2, help="samples per task and length (default 2)")
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--chunk-tokens", type=int, default=512, help="tokens per document (default 512)")
    parser.add_argument("--target-tokenizer", default=None,
                        help="tokenizer that counts lengths and the budget (default: the draft's, which the "
                             "packaged target shares)")
    add_model_options(parser, target=False)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    draft = load_model(args.draft, dtype=args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.target_tokenizer) if args.target_tokenizer else draft.tokenizer
    generator = TaskGenerator(tokenizer, chunk_tokens=args.chunk_tokens)
    log = StudyLog(args.out, RESULTS_FILE, ("task", "length", "sample_id", "budget", "dtype"))
    dtype = draft.dtype_name
    for length in args.lengths:
        for task in args.tasks:
            for sample in generator.samples(task, length, args.samples):
                if log.has(task=task, length=length, sample_id=sample.sample_id, budget=args.budget, dtype=dtype):
                    continue
                row = study_sample(draft, tokenizer, sample, args.budget)
                log.add(row)
                print(f"{task} {length} #{sample.sample_id}: uncached {row['uncached_s']:.1f} s, cold "
                      f"{row['cold_s']:.1f} s, warm {row['warm_s']:.2f} s, kept {row['kept_uncached']}/"
                      f"{row['kept_cached']}, overlap {row['overlap']:.2f}", flush=True)
    log.summarize(SUMMARY_FILE, summarize)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
