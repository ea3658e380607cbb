"""What SpecKV saves in one call: peak KV bytes, time to first token and the answer, against the full cache.

For each needle sample (``niah_single`` by default, about ``--length`` prompt tokens) the packaged target
answers the same prompt, one configuration after another in one process: ``full`` (no eviction), ``speckv``
at ``--kv-budget`` (eviction inside the one-pass prefill), the same with a chunked prefill (evicts after
the full cache was built), and the SpecKV-PC cascade (``prompt_budget``: SpecPC shortens the context first).
A row records ``peak_kv_bytes`` (the most KV bytes the cache held during the call), the kept cache, TTFT,
and whether the answer holds the needle. Rows are appended to a JSON-lines file; a rerun skips rows there.

    python -m benchmarks.memory_study --length 4096 --kv-budget 256 --prompt-budget 1024 --out docs/bench
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks.study import StudyLog, add_model_options, load_pair, mean
from draft_rag.bench.tasks import TASKS, TaskGenerator

RESULTS_FILE = "speckv_memory.jsonl"
SUMMARY_FILE = "speckv_memory.md"


def configurations(kv_budget: int, prompt_budget: int) -> dict[str, dict[str, Any]]:
    """The engine settings compared, by label."""
    return {
        "full": {"method": "full"},
        f"speckv @ {kv_budget}": {"method": "speckv", "budget": kv_budget},
        f"speckv @ {kv_budget}, chunked prefill 1024": {"method": "speckv", "budget": kv_budget, "chunk_size": 1024},
        f"speckv-pc @ {kv_budget}, prompt {prompt_budget}": {
            "method": "speckv", "budget": kv_budget, "prompt_budget": prompt_budget,
        },
    }


def summarize(rows: list[dict[str, Any]]) -> str:
    """Markdown: per configuration, n, needle answered, mean peak KV and its ratio to full's, kept KV, TTFT."""
    lines = ["| configuration | n | answered | peak KV MiB | peak / full | kept KV MiB | prompt tokens | TTFT s | "
             "TTFT / full |", "|---|---|---|---|---|---|---|---|---|"]
    full = [r for r in rows if r["config"] == "full"]
    full_peak, full_ttft = mean(full, "peak_kv_bytes"), mean(full, "ttft_s")
    for config in dict.fromkeys(r["config"] for r in rows):
        group = [r for r in rows if r["config"] == config]
        peak, ttft = mean(group, "peak_kv_bytes"), mean(group, "ttft_s")
        peak_ratio = f"{peak / full_peak:.3f}" if full_peak else "—"
        ttft_ratio = f"{ttft / full_ttft:.2f}" if full_ttft else "—"
        lines.append(
            f"| {config} | {len(group)} | {sum(r['score'] for r in group):.0f}/{len(group)} | "
            f"{peak / 2**20:.1f} | {peak_ratio} | {mean(group, 'kv_bytes_kept') / 2**20:.1f} | "
            f"{mean(group, 'prompt_tokens'):.0f} | {ttft:.1f} | {ttft_ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, default="niah_single")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--kv-budget", type=int, default=256)
    parser.add_argument("--prompt-budget", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    add_model_options(parser)
    args = parser.parse_args(argv)

    from draft_rag import SpecKV

    target, draft = load_pair(args)
    generator = TaskGenerator(target.tokenizer, seed=args.seed)
    log = StudyLog(args.out, RESULTS_FILE, ("config", "task", "length", "sample_id", "seed"))
    for sample in generator.samples(args.task, args.length, args.samples):
        for label, settings in configurations(args.kv_budget, args.prompt_budget).items():
            if log.has(config=label, task=sample.task, length=sample.length, sample_id=sample.sample_id,
                       seed=args.seed):
                continue
            engine = SpecKV(target=target, draft=draft, **settings)
            started = time.perf_counter()
            result = engine.generate(sample.prompt(), max_new_tokens=sample.max_new_tokens)
            row = {
                "config": label, "task": sample.task, "length": sample.length, "sample_id": sample.sample_id,
                "seed": args.seed, "dtype": target.dtype_name,
                "prompt_tokens": result.prompt_tokens, "score": sample.score(result.text), "answer": result.text,
                "peak_kv_bytes": result.peak_kv_bytes, "kv_bytes_kept": result.kv_bytes_kept,
                "kv_bytes_full": result.kv_bytes_full, "ttft_s": result.timings["ttft_s"],
                "timings": result.timings, "total_s": time.perf_counter() - started,
            }
            log.add(row)
            print(f"{label}: peak {row['peak_kv_bytes'] / 2**20:.1f} MiB, TTFT {row['ttft_s']:.1f} s, "
                  f"score {row['score']:.0f}, answer {result.text!r}", flush=True)
    log.summarize(SUMMARY_FILE, summarize)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
