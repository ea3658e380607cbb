"""SpecPC refinements on a tuning seed: does the compressed text still hold the gold answers?

Each variant of :class:`draft_rag.SpecPC` (see :data:`VARIANTS`) compresses every sample once per budget, in
one process; a row records whether the kept text holds each gold answer (the task's own string match, so a
two-hop or multi-value answer needs all of its facts kept) and the compression time. Only the draft runs,
so this is a cheap proxy for the target's accuracy: a fact the compressor drops, no target can answer from.
Run it on a seed the reported benchmark does not use (default 1), adopt the winner, then report on seed 0.
Rows are appended to a JSON-lines file as they are made; a rerun skips the rows already there.

    python -m draft_rag.bench.specpc_tuning --length 4096 --budgets 256 512 --samples 5 --out docs/bench
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from draft_rag.bench.study import StudyLog, mean
from draft_rag.bench.tasks import TASKS, TaskGenerator
from draft_rag.models import DEFAULT_DRAFT, load_model

RESULTS_FILE = "specpc_tuning.jsonl"
SUMMARY_FILE = "specpc_tuning.md"

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "lookahead 8": {"lookahead_tokens": 8},
    "question observers": {"observe_from": "question"},
    "document boundaries": {"document_boundaries": True},
    "lookahead 8, ramp over window": {"lookahead_tokens": 8, "ramp_window_only": True},
    "document boundaries, question observers": {"document_boundaries": True, "observe_from": "question"},
}


def summarize(rows: list[dict[str, Any]]) -> str:
    """Markdown: answer kept (%) per variant, per budget and task, with n and mean compression seconds."""
    tasks = sorted({r["task"] for r in rows})
    lines = ["| variant | budget | n | kept | " + " | ".join(tasks) + " | compress s |",
             "|---|---|---|---|" + "---|" * len(tasks) + "---|"]
    for variant in [v for v in VARIANTS if any(r["variant"] == v for r in rows)]:
        for budget in sorted({r["budget"] for r in rows}):
            group = [r for r in rows if r["variant"] == variant and r["budget"] == budget]
            if not group:
                continue
            cells = []
            for task in tasks:
                cell = [r for r in group if r["task"] == task]
                cells.append(f"{100 * mean(cell, 'kept'):.0f}%" if cell else "—")
            lines.append(f"| {variant} | {budget} | {len(group)} | {100 * mean(group, 'kept'):.0f}% | "
                         + " | ".join(cells) + f" | {mean(group, 'seconds'):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None,
                        help="tasks (default: every task but common_words and variable_tracking)")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--budgets", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--samples", type=int, default=5, help="samples per task (default 5)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=1, help="task seed (default 1, a tuning seed)")
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--draft", default=DEFAULT_DRAFT)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    if args.seed == 0:
        parser.error("seed 0 is the reported benchmark's seed; tune on another one.")

    from draft_rag import SpecPC

    draft = load_model(args.draft, dtype=args.dtype)
    tasks = args.tasks or [t for t in TASKS if t not in ("common_words", "variable_tracking")]
    generator = TaskGenerator(draft.tokenizer, seed=args.seed, chunk_tokens=args.chunk_tokens)
    log = StudyLog(args.out, RESULTS_FILE, ("variant", "task", "length", "sample_id", "budget", "seed"))
    for task in tasks:
        for sample in generator.samples(task, args.length, args.samples):
            for variant in args.variants:
                for budget in args.budgets:
                    if log.has(variant=variant, task=task, length=args.length, sample_id=sample.sample_id,
                               budget=budget, seed=args.seed):
                        continue
                    pc = SpecPC(draft=draft, budget=budget, progress=False, **VARIANTS[variant])
                    started = time.perf_counter()
                    result = pc.compress(sample.question, sample.documents)
                    row = {"variant": variant, "task": task, "length": args.length, "sample_id": sample.sample_id,
                           "budget": budget, "seed": args.seed, "kept": sample.score("\n".join(result.texts)),
                           "seconds": time.perf_counter() - started, "kept_tokens": result.total_kept_tokens}
                    log.add(row)
                    print(f"{variant} | {task} #{sample.sample_id} @ {budget}: kept {row['kept']:.2f} "
                          f"({row['seconds']:.1f} s)", flush=True)
    log.summarize(SUMMARY_FILE, summarize)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
