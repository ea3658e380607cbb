"""How long SpecKV's draft answer should be: accuracy and time per lookahead length, on a tuning seed.

For every benchmark sample (tasks and seed on the command line; use a seed the reported benchmark does not
use), the same generation runs once per lookahead length in one process: ``0`` is SnapKV (no draft, the
prompt window alone observes), ``N`` is SpecKV whose draft answers with at most ``N`` tokens. A row records
the answer's score, the draft's time, time to first token and the whole call's time. Rows are appended to
a JSON-lines file as they are made; a rerun skips the rows already there.

    python -m benchmarks.lookahead_study --length 2048 --kv-budget 128 --seed 1 --out docs/bench
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks.study import StudyLog, add_model_options, load_pair, mean
from draft_rag.bench.hardware import hardware_label
from draft_rag.bench.tasks import TASKS, TaskGenerator

RESULTS_FILE = "lookahead.jsonl"
SUMMARY_FILE = "lookahead.md"
LOOKAHEADS = ("0", "8", "16", "32", "64", "max")


def parse_lookahead(value: str) -> int | str:
    """``"max"`` (the engine's default: up to the task's ``max_new_tokens``) or a non-negative integer."""
    if value == "max":
        return value
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"lookahead must be a non-negative integer or 'max', got {value!r}")
    return number


def study_row(engine: Any, sample: Any, lookahead: int | str) -> dict[str, Any]:
    """Generate ``sample``'s answer with ``engine`` (already set to ``lookahead``) and time it."""
    started = time.perf_counter()
    result = engine.generate(sample.prompt(), max_new_tokens=sample.max_new_tokens)
    return {
        "task": sample.task, "length": sample.length, "sample_id": sample.sample_id, "lookahead": lookahead,
        "max_new_tokens": sample.max_new_tokens, "prompt_tokens": result.prompt_tokens,
        "score": sample.score(result.text), "answer": result.text,
        "draft_s": result.timings.get("draft_s", 0.0), "ttft_s": result.timings["ttft_s"],
        "total_s": time.perf_counter() - started,
    }


def summarize(rows: list[dict[str, Any]]) -> str:
    """A markdown table: per lookahead, n, accuracy overall and per task, mean draft / TTFT / total seconds; then
    the machines and dtypes that timed the rows."""
    tasks = sorted({r["task"] for r in rows})
    lines = [
        "| lookahead | n | accuracy | " + " | ".join(tasks) + " | draft s | TTFT s | total s | TTFT vs 0 |",
        "|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|",
    ]
    base_ttft = mean([r for r in rows if r["lookahead"] == 0], "ttft_s")
    for lookahead in sorted({r["lookahead"] for r in rows}, key=lambda la: (isinstance(la, str), str(la).zfill(6))):
        group = [r for r in rows if r["lookahead"] == lookahead]
        per_task = []
        for task in tasks:
            cell = [r for r in group if r["task"] == task]
            per_task.append(f"{100 * mean(cell, 'score'):.0f}% (n={len(cell)})" if cell else "—")
        ratio = f"{mean(group, 'ttft_s') / base_ttft:.2f}x" if base_ttft else "—"
        label = {0: "0 (SnapKV)", "max": "up to max_new_tokens"}.get(lookahead, str(lookahead))
        lines.append(
            f"| {label} | {len(group)} | {100 * mean(group, 'score'):.0f}% | " + " | ".join(per_task)
            + f" | {mean(group, 'draft_s'):.1f} | {mean(group, 'ttft_s'):.1f} | {mean(group, 'total_s'):.1f} | "
            f"{ratio} |"
        )
    timed_on = sorted({f"{r.get('machine', 'an unrecorded machine')}, {r.get('dtype', 'unrecorded dtype')}"
                       for r in rows})
    lines += ["", f"Timed on {'; '.join(timed_on)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["niah_multikey", "niah_multivalue", "qa"])
    parser.add_argument("--length", type=int, default=2048, help="prompt tokens (default 2048)")
    parser.add_argument("--samples", type=int, default=2, help="samples per task (default 2)")
    parser.add_argument("--lookaheads", nargs="+", type=parse_lookahead,
                        default=[parse_lookahead(v) for v in LOOKAHEADS],
                        help="draft answer lengths; 0 runs SnapKV, max is the engine's default of up to the "
                        "task's max_new_tokens (default 0 8 16 32 64 max)")
    parser.add_argument("--kv-budget", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1, help="task seed (default 1, a tuning seed)")
    parser.add_argument("--chunk-tokens", type=int, default=256)
    add_model_options(parser)
    args = parser.parse_args(argv)

    from draft_rag import SpecKV

    target, draft = load_pair(args)
    generator = TaskGenerator(target.tokenizer, seed=args.seed, chunk_tokens=args.chunk_tokens)
    timed_on = {"machine": hardware_label(str(target.device)), "dtype": target.dtype_name}
    log = StudyLog(args.out, RESULTS_FILE, ("task", "length", "sample_id", "lookahead", "kv_budget", "seed"))
    engines = {
        la: SpecKV(target=target, draft=draft, method="snapkv" if la == 0 else "speckv", budget=args.kv_budget,
                   lookahead_tokens=None if la == "max" else la or None)
        for la in args.lookaheads
    }
    for task in args.tasks:
        for sample in generator.samples(task, args.length, args.samples):
            for lookahead, engine in engines.items():
                if log.has(task=task, length=args.length, sample_id=sample.sample_id, lookahead=lookahead,
                           kv_budget=args.kv_budget, seed=args.seed):
                    continue
                row = study_row(engine, sample, lookahead) | {
                    "kv_budget": args.kv_budget, "seed": args.seed, **timed_on,
                }
                log.add(row)
                print(f"{task} #{sample.sample_id} lookahead {lookahead}: score {row['score']:.2f}, draft "
                      f"{row['draft_s']:.1f} s, TTFT {row['ttft_s']:.1f} s", flush=True)
    log.summarize(SUMMARY_FILE, summarize)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
