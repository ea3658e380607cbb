"""``draft-rag bench``: accuracy, latency and memory of SpecPC / SpecKV against baselines.

Example (the default tasks at 4k tokens; prompt-side budgets 256/512/1024, KV-side 128/256)::

    draft-rag bench --methods full specpc specpc-paper embedding truncate snapkv-pc llmlingua \\
        speckv snapkv streamingllm --budgets 256 512 1024 --kv-budgets 128 256 --samples 20 --seed 0 --out bench-out
    draft-rag bench --preset tiny --out /tmp/bench-tiny      # tiny random models: plumbing only

Writes ``results.jsonl`` (resumable), ``summary.md``, ``accuracy_vs_budget.png`` and
``accuracy_vs_time.png`` into ``--out``. ``llmlingua`` needs ``bash scripts/llmlingua-env.sh`` first; without
it the method is skipped with a message saying so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from draft_rag.bench.hardware import hardware_label
from draft_rag.bench.methods import KV_METHODS, METHODS
from draft_rag.bench.tasks import DEFAULT_TASKS, TASKS
from draft_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET

if TYPE_CHECKING:
    from draft_rag.bench.runner import BenchConfig
    from draft_rag.models import LoadedModel

PRESETS: dict[str, dict[str, Any]] = {
    # Full-size defaults: the packaged pair at 4k tokens.
    "default": {"lengths": [4096], "budgets": [256, 512, 1024], "kv_budgets": [128, 256], "samples": 20,
                "max_new_tokens": None},
    # Tiny random models built in code: checks plumbing and file formats in seconds.
    "tiny": {"lengths": [512], "budgets": [64, 128], "samples": 1, "max_new_tokens": 8},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(DEFAULT_TASKS),
                        help=f"tasks (default: {' '.join(DEFAULT_TASKS)})")
    parser.add_argument("--lengths", nargs="+", type=int,
                        help="prompt lengths in target tokens (default 4096)")
    parser.add_argument("--budgets", nargs="+", type=int,
                        help="prompt-side budgets in context tokens (default 256 512 1024)")
    parser.add_argument("--kv-budgets", nargs="+", type=int,
                        help="KV-side budgets in KV entries per head (default 128 256; with --budgets: the same)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods; 'full' always runs as the reference (default: all); with --report-only, the "
                             "methods the report compares")
    parser.add_argument("--samples", type=int, help="samples per task and length (default 20)")
    parser.add_argument("--reverse", action="store_true",
                        help="run the samples from the last one down, e.g. on a second kind of machine that fills "
                             "the same samples from the other end into its own --out (see --merge)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory (bench-out)")
    parser.add_argument("--draft", default=DEFAULT_DRAFT, help=f"draft model (default {DEFAULT_DRAFT})")
    parser.add_argument("--target", default=DEFAULT_TARGET, help=f"target model (default {DEFAULT_TARGET})")
    parser.add_argument("--dtype", default=None,
                        help="model dtype, e.g. bfloat16 or float32 (default: bf16 where the hardware has it)")
    parser.add_argument("--seed", type=int, default=0, help="task generator seed (default 0)")
    parser.add_argument("--chunk-tokens", type=int, default=256,
                        help="tokens per context document (default 256)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="'tiny' uses tiny random models (plumbing check; accuracy meaningless)")
    parser.add_argument("--tiny", dest="preset", action="store_const", const="tiny",
                        help="same as --preset tiny")
    parser.add_argument("--report-only", action="store_true",
                        help="only rebuild summary.md and the plots from --out/results.jsonl (the latest row "
                             "of each task, length, sample, method and budget)")
    parser.add_argument("--merge", nargs="+", type=Path, default=[], metavar="DIR",
                        help="with --report-only: also read the results of the same benchmark run on another "
                             "machine or dtype from these directories; each sample's rows come from the one run "
                             "that has the most of them, and latency is shown per run (--out may then hold no "
                             "results of its own: it takes the report)")


def run(args: argparse.Namespace) -> int:
    from draft_rag.bench.methods import build_methods, unavailable_reason
    from draft_rag.bench.runner import run_bench
    from draft_rag.bench.tasks import TaskGenerator

    if args.merge and not args.report_only:
        msg = ("--merge combines finished results into one report; use it with --report-only (run each "
               "machine's rows into its own --out first).")
        raise ValueError(msg)
    if args.report_only:
        rows, sources = _stored_rows([args.out, *args.merge], {"full", *args.methods})
        reported = {row["method"] for row in rows}  # a method that cannot run here may have rows from elsewhere
        skipped = {name: reason for name in args.methods
                   if name not in reported and (reason := unavailable_reason(name))}
        _report(rows, args.out, skipped, seconds=None, sources=sources)
        return 0

    config = config_from_args(args)
    started = time.perf_counter()
    draft, target, specpc_settings = _models(args)
    config.draft, config.target = draft.name, target.name
    config.dtype = target.dtype_name
    config.machine = hardware_label(str(target.device))
    methods, skipped = build_methods(
        args.methods, draft=draft, target=target, specpc_settings=specpc_settings,
        kv_budgets=config.kv_budgets or config.budgets,
    )
    for name, reason in skipped.items():
        print(f"draft-rag bench: skipping {name}: {reason}", file=sys.stderr)
    generator = TaskGenerator(target.tokenizer, seed=args.seed, chunk_tokens=args.chunk_tokens)
    rows = run_bench(config, methods, generator, args.out)
    _report(rows, args.out, skipped, seconds=time.perf_counter() - started)
    return 0


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The run's settings from the command line and its preset (models are filled in once loaded)."""
    from draft_rag.bench.runner import BenchConfig

    preset = PRESETS[args.preset]
    config = BenchConfig(
        tasks=args.tasks,
        lengths=args.lengths or preset["lengths"],
        budgets=args.budgets or preset["budgets"],
        # Explicit --budgets without --kv-budgets apply to both sides.
        kv_budgets=args.kv_budgets or (None if args.budgets else preset.get("kv_budgets")),
        samples=preset["samples"] if args.samples is None else args.samples,
        seed=args.seed,
        chunk_tokens=args.chunk_tokens,
        max_new_tokens=preset.get("max_new_tokens"),
        reverse=args.reverse,
    )
    for name in ("lengths", "budgets", "kv_budgets"):
        if any(value < 1 for value in getattr(config, name) or ()):
            msg = f"--{name.replace('_', '-')} must be positive numbers of tokens."
            raise ValueError(msg)
    if config.samples < 1:
        msg = f"--samples must be >= 1, got {config.samples}."
        raise ValueError(msg)
    return config


def _stored_rows(directories: list[Path], methods: set[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of ``methods`` to report from results files (:func:`~draft_rag.bench.runner.merge_runs` of
    several), and a line per file saying how many of its samples the report takes from it.

    Other methods' rows are set aside before the runs are merged, so a sample comes from the run that has the
    most of the reported rows (the files keep every row)."""
    from draft_rag.bench.report import run_label
    from draft_rag.bench.runner import RESULTS_FILE, latest_rows, merge_runs, read_rows, sample_key

    found: list[tuple[Path, list[dict[str, Any]]]] = []
    for index, directory in enumerate(directories):
        rows = [row for row in latest_rows(read_rows(directory / RESULTS_FILE)) if row["method"] in methods]
        if not rows and index == 0 and len(directories) > 1:
            continue  # --out only takes the report of the --merge directories' rows
        if not rows:
            msg = f"--report-only found no rows in {directory / RESULTS_FILE}; run the benchmark first."
            raise FileNotFoundError(msg)
        found.append((directory, rows))
    runs = [rows for _, rows in found]
    taken = merge_runs(runs)
    rows = [row for part in taken for row in part]
    if len(runs) == 1:
        return rows, []
    sources = []
    for (directory, _), part in zip(found, taken, strict=True):
        samples = len({sample_key(r) for r in part})
        runs_named = ", ".join(dict.fromkeys(run_label(r) for r in part)) or "none"
        sources.append(f"{samples} samples ({len(part)} rows) from {directory / RESULTS_FILE}: {runs_named}")
    return rows, sources


def _report(
    rows: list[dict[str, Any]], out: Path, skipped: dict[str, str], seconds: float | None,
    sources: list[str] | None = None,
) -> None:
    """Write summary.md and the plots for ``rows`` and say where they are (``sources``: where merged rows came
    from, one line per results file)."""
    from draft_rag.bench.report import complete_samples, plot_accuracy, plot_accuracy_vs_time, write_summary

    out.mkdir(parents=True, exist_ok=True)
    shown, left_out = complete_samples(rows)
    notes = _notes(shown or rows, seconds)
    if sources:
        notes.append("rows of several runs, each sample's from one run only (so methods are compared within one "
                     "machine and dtype; accuracy pools the samples, latency is per run): " + "; ".join(sources))
    if not shown:
        shown = rows
        notes.append("no sample has been answered by every method and budget yet: the tables mix samples")
    elif left_out:
        notes.append(f"{left_out} rows of samples that not every method and budget has answered yet are left out "
                     "of the tables and plots, so every method is compared on the same samples (the rows stay in "
                     "results.jsonl; a resumed run completes those samples)")
    summary = write_summary(shown, out, notes=notes, skipped=skipped)
    plots = [plot_accuracy(shown, out), plot_accuracy_vs_time(shown, out)]
    where = f"{len(sources)} results files" if sources else out / "results.jsonl"
    print(f"{len(rows)} rows from {where}\n{summary}\n" + "\n".join(map(str, plots)))


def _models(args: argparse.Namespace) -> tuple[LoadedModel, LoadedModel, dict[str, Any] | None]:
    """The draft, the target, and SpecPC settings suited to them (None: the library defaults)."""
    if args.preset == "tiny":
        from draft_rag.bench.tiny import TINY_SPECPC_SETTINGS, tiny_pair

        draft, target = tiny_pair()
        return draft, target, TINY_SPECPC_SETTINGS
    from draft_rag.models import load_model

    return load_model(args.draft, dtype=args.dtype), load_model(args.target, dtype=args.dtype), None


def _notes(rows: list[dict[str, Any]], seconds: float | None) -> list[str]:
    """The settings lines at the top of summary.md, read from the rows themselves."""

    def values(key: str, among: list[dict[str, Any]] = rows) -> str:
        return ", ".join(str(v) for v in dict.fromkeys(r.get(key) for r in among) if v is not None)

    samples = [len({r["sample_id"] for r in rows if (r["task"], r["length"]) == key})
               for key in {(r["task"], r["length"]) for r in rows}]
    notes = [
        f"draft `{values('draft')}`, target `{values('target')}`, dtype {values('dtype') or 'float32'}; "
        f"timed on {values('machine') or 'an unrecorded machine'}; greedy answers",
        f"tasks {values('task')}; lengths {values('length')}; prompt-side budgets "
        f"{values('budget', [r for r in rows if r['method'] not in KV_METHODS]) or '–'}; KV-side budgets "
        f"{values('budget', [r for r in rows if r['method'] in KV_METHODS]) or '–'}; "
        f"{min(samples)}{'' if min(samples) == max(samples) else f'-{max(samples)}'} samples per task "
        f"and length; seed {values('seed')}; "
        f"{values('chunk_tokens') or '256'}-token documents",
        f"{len(rows)} rows; their measured seconds add up to {sum(r['total_s'] for r in rows) / 60:.1f} min",
    ]
    settings = {r["method"]: r["method_settings"] for r in rows if r.get("method_settings")}
    for method, chosen in settings.items():
        notes.append(f"`{method}` settings: " + ", ".join(f"{k}={v}" for k, v in chosen.items()))
    if seconds is not None:
        notes.append(f"this invocation took {seconds / 60:.1f} min (rows already in results.jsonl were reused)")
    return notes
