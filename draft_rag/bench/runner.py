"""Run methods over generated samples and append one JSON row per sample x method x budget.

Rows already present in ``results.jsonl`` are not recomputed, so an interrupted run resumes where it
stopped. A row is reused only when every setting that changes a result (:data:`SETTINGS`: the models,
the seed, the document size, the answer cap) matches the run's; rows of other settings, and rows that do
not record them all, stay in the file but are neither reused nor returned. The ``full`` method (the
target reading everything) runs once per sample; every other method runs once per budget. Jobs go sample
by sample, so a run cut short still covers every task evenly.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from draft_rag.bench.methods import KV_METHODS, Method
from draft_rag.bench.tasks import Sample, TaskGenerator

RESULTS_FILE = "results.jsonl"
SETTINGS = ("draft", "target", "dtype", "seed", "chunk_tokens", "max_new_tokens")
"""The :class:`BenchConfig` fields written into every row that, with the job itself, decide its result."""


@dataclass
class BenchConfig:
    """What to run.

    Args:
        tasks: task names (see :data:`draft_rag.bench.tasks.TASKS`).
        lengths: prompt lengths in target tokens.
        budgets: context-token budgets for the prompt-side methods.
        kv_budgets: KV entries per head for the KV-side methods (default: ``budgets``).
        samples: samples per task and length.
        seed: generator seed (default 0).
        chunk_tokens: size of each context document in tokens (default 256).
        max_new_tokens: cap on every answer's length (default: each task's own, 32 to 96 tokens).
        draft, target: names of the draft and target models.
        dtype: the models' dtype (``"float32"``, ``"bfloat16"``...), as :func:`draft_rag.models.load_model`
            chose it.
    """

    tasks: Sequence[str]
    lengths: Sequence[int]
    budgets: Sequence[int]
    samples: int
    kv_budgets: Sequence[int] | None = None
    seed: int = 0
    chunk_tokens: int = 256
    max_new_tokens: int | None = None
    draft: str = ""
    target: str = ""
    dtype: str = ""

    def settings(self) -> dict[str, Any]:
        """The values of :data:`SETTINGS`, as every row of this configuration records them."""
        return {name: getattr(self, name) for name in SETTINGS}


def row_key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """What identifies a row: task, length, sample, method and budget."""
    return (row["task"], row["length"], row["sample_id"], row["method"], row["budget"])


def same_settings(row: Mapping[str, Any], config: BenchConfig) -> bool:
    """True when ``row`` records every setting of ``config`` with the same value (a missing one differs)."""
    return all(name in row and row[name] == value for name, value in config.settings().items())


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file (none when it does not exist); a half-written last line is ignored."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


Job = tuple[str, int, int, str, "int | None"]
"""``(task, length, sample index, method, budget)``, the same order as :func:`row_key`."""


def plan(config: BenchConfig, methods: Mapping[str, Method]) -> list[Job]:
    """All jobs, sample-major: every task and method for sample 0, then sample 1..."""
    kv_budgets = config.kv_budgets or config.budgets
    budgets: dict[str, Sequence[int | None]] = {
        name: (kv_budgets if name in KV_METHODS else config.budgets) if method.budgeted else [None]
        for name, method in methods.items()
    }
    return [
        (task, length, index, name, budget)
        for index in range(config.samples)
        for length in config.lengths
        for task in config.tasks
        for name in methods
        for budget in budgets[name]
    ]


def run_bench(
    config: BenchConfig,
    methods: Mapping[str, Method],
    generator: TaskGenerator,
    out: Path,
    *,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every job not yet in ``out/results.jsonl`` for ``config``'s settings, appending rows as they finish.

    Returns the rows of this configuration: those reused from the file and the new ones.
    """
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    found = read_rows(path)
    rows = [row for row in found if same_settings(row, config)]
    if len(rows) < len(found):
        print(f"draft-rag bench: {len(found) - len(rows)} rows in {path} were made with other settings "
              f"than {config.settings()} (or do not record them all); they are kept but not reused.",
              file=sys.stderr)
    done = {row_key(row) for row in rows}
    todo = [job for job in plan(config, methods) if job not in done]
    samples: dict[tuple[str, int, int], Sample] = {}
    with open(path, "a", encoding="utf-8") as sink, tqdm(total=len(todo), disable=not progress,
                                                         desc="bench", unit="run") as bar:
        for task, length, index, name, budget in todo:
            bar.set_postfix_str(f"{task}@{length} #{index} {name} {budget or ''}".strip())
            key = (task, length, index)
            if key not in samples:
                sample = generator.sample(task, length, index)
                if config.max_new_tokens:
                    sample = replace(sample, max_new_tokens=min(sample.max_new_tokens, config.max_new_tokens))
                samples[key] = sample
            sample = samples[key]
            with peak_rss() as peak:
                outcome = methods[name].run(sample, budget)
            row = {
                "task": task,
                "length": length,
                "sample_id": index,
                "method": name,
                "budget": budget,
                "accuracy": sample.score(outcome.answer),
                "compress_s": round(outcome.compress_s, 3),
                "answer_s": round(outcome.answer_s, 3),
                "total_s": round(outcome.compress_s + outcome.answer_s, 3),
                "peak_rss_mb": round(peak[0] / 2**20, 1),
                "kv_bytes": outcome.kv_bytes,
                "prompt_tokens": outcome.prompt_tokens,
                "context_tokens": outcome.context_tokens,
                "answer": outcome.answer,
                "gold": sample.answers,
                **config.settings(),
            }
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
            rows.append(row)
            bar.update()
    return rows


@contextmanager
def peak_rss(interval: float = 0.02) -> Iterator[list[int]]:
    """Sample this process's resident memory while the block runs; ``[peak bytes]`` is filled on exit.

    The process-wide high-water mark (``ru_maxrss``) never goes down, so it cannot tell one method's
    peak from an earlier one's; a sampling thread can.
    """
    import psutil

    process = psutil.Process()
    peak = [process.memory_info().rss]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval):
            peak[0] = max(peak[0], process.memory_info().rss)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield peak
    finally:
        stop.set()
        watcher.join()
        peak[0] = max(peak[0], process.memory_info().rss)
