"""Run methods over generated samples and append one JSON row per sample x method x budget.

Rows already present in ``results.jsonl`` are not recomputed, so an interrupted run resumes where it
stopped. A row is reused only when everything that changes its result matches the run's: the job itself
(task, length, sample index, method, budget), the run's :data:`SETTINGS` (the models, their dtype, the
hardware that timed it, the seed, the document size, the answer cap), the sample (``sample_hash``: a
fingerprint of the prompt and the gold answers, so a change to a task's generator is not mistaken for the
same sample) and the method's own settings (``method_settings``). Rows that differ, or do not record all
of these, stay in the file but are neither reused nor returned. The ``full`` method (the target reading
everything) runs once per sample and is the reference for every prompt-side and KV-side method and budget;
every other method runs once per budget. Jobs go sample by sample, so a run cut short still covers every task evenly.
"""

from __future__ import annotations

import hashlib
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
SETTINGS = ("draft", "target", "dtype", "machine", "seed", "chunk_tokens", "max_new_tokens")
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
        machine: the hardware the run is timed on (:func:`draft_rag.bench.hardware.hardware_label`): seconds measured on
            another machine are not comparable, so its rows are not reused.
        reverse: run the samples from the last one down (the order only, not a setting rows record), so that a
            run on a second kind of machine can fill the same samples from the other end without overlap.
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
    machine: str = ""
    reverse: bool = False

    def settings(self) -> dict[str, Any]:
        """The values of :data:`SETTINGS`, as every row of this configuration records them."""
        return {name: getattr(self, name) for name in SETTINGS}


SAMPLE_FIELDS = ("task", "length", "sample_id")


def sample_key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """The sample a row answered: its :data:`SAMPLE_FIELDS` (task, length and sample index)."""
    return tuple(row[field] for field in SAMPLE_FIELDS)


def row_key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """What identifies a row within one configuration: task, length, sample, method and budget."""
    return (*sample_key(row), row["method"], row["budget"])


def sample_hash(sample: Sample) -> str:
    """A short fingerprint of what a sample asks: its prompt and its gold answers."""
    text = json.dumps([sample.prompt(), sample.answers, sample.metric], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def latest_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What ``--report-only`` reports of a file that runs appended to: one row per :func:`row_key`, the last one
    written, among the rows made with the settings (run and method) of each method's last row. So rows of an
    older configuration drop out even for jobs that the newer one has not reached yet."""

    def made_with(row: Mapping[str, Any]) -> str:
        return json.dumps([row.get("method_settings"), [row.get(name) for name in SETTINGS]], sort_keys=True)

    current = {row["method"]: made_with(row) for row in rows}
    latest = {row_key(row): dict(row) for row in rows if made_with(row) == current[row["method"]]}
    return list(latest.values())


def merge_runs(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[list[dict[str, Any]]]:
    """Choose, from several results files of one benchmark run on different machines or dtypes, which rows to
    report together: the rows taken from each run, in the order of ``runs``.

    Each sample (task, length, sample index) takes all its rows from one run: the one with the most rows for
    it, the earliest in ``runs`` on a tie. So every comparison of methods on a sample stays within one machine
    and dtype, while the accuracy tables count the samples of all runs. Pass each file's :func:`latest_rows`.
    """
    counts: dict[tuple[Any, ...], list[int]] = {}
    for position, rows in enumerate(runs):
        for row in rows:
            counts.setdefault(sample_key(row), [0] * len(runs))[position] += 1
    chosen = {key: max(range(len(runs)), key=lambda p: (found[p], -p)) for key, found in counts.items()}
    return [[dict(row) for row in rows if chosen[sample_key(row)] == position]
            for position, rows in enumerate(runs)]


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
    """All jobs, sample-major: every task and method for sample 0, then sample 1... (the last sample first when
    ``config.reverse``)."""
    kv_budgets = config.kv_budgets or config.budgets
    budgets: dict[str, Sequence[int | None]] = {
        name: (kv_budgets if name in KV_METHODS else config.budgets) if method.budgeted else [None]
        for name, method in methods.items()
    }
    return [
        (task, length, index, name, budget)
        for index in (reversed(range(config.samples)) if config.reverse else range(config.samples))
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
        settings = config.settings()
        differ = sorted({name for row in found for name, value in settings.items() if row.get(name) != value})
        print(f"draft-rag bench: {len(found) - len(rows)} rows in {path} differ from this run in "
              f"{', '.join(differ)} (this run: {settings}); they are kept but not reused. To add to them, run "
              f"with their settings on the hardware their `machine` names, or write to another --out.",
              file=sys.stderr)
    jobs = plan(config, methods)
    samples: dict[tuple[str, int, int], Sample] = {}
    for task, length, index, _, _ in jobs:
        if (task, length, index) not in samples:
            sample = generator.sample(task, length, index)
            if config.max_new_tokens:
                sample = replace(sample, max_new_tokens=min(sample.max_new_tokens, config.max_new_tokens))
            samples[task, length, index] = sample
    hashes = {key: sample_hash(sample) for key, sample in samples.items()}

    def current(row: Mapping[str, Any]) -> bool:
        # Rows of samples or methods outside this run are kept when they record what made them.
        if "sample_hash" not in row or "method_settings" not in row:
            return False
        expected = hashes.get(sample_key(row), row["sample_hash"])
        method = methods.get(row["method"])
        settings = row["method_settings"] if method is None else _settings_of(method)
        return bool(row["sample_hash"] == expected and row["method_settings"] == settings)

    stale = [row for row in rows if not current(row)]
    if stale:
        print(f"draft-rag bench: {len(stale)} rows in {path} were made for other samples or method settings "
              "(a changed task generator or method); they are kept but not reused.", file=sys.stderr)
    rows = [row for row in rows if current(row)]
    done = {row_key(row) for row in rows}
    todo = [job for job in jobs if job not in done]
    with open(path, "a", encoding="utf-8") as sink, tqdm(total=len(todo), disable=not progress,
                                                         desc="bench", unit="run") as bar:
        for task, length, index, name, budget in todo:
            bar.set_postfix_str(f"{task}@{length} #{index} {name} {budget or ''}".strip())
            sample = samples[task, length, index]
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
                "warm_s": round(outcome.warm_s, 3),
                "answer_s": round(outcome.answer_s, 3),
                "total_s": round(outcome.compress_s + outcome.answer_s, 3),
                "peak_rss_mb": round(peak[0] / 2**20, 1),
                "kv_bytes": outcome.kv_bytes,
                "prompt_tokens": outcome.prompt_tokens,
                "context_tokens": outcome.context_tokens,
                "answer": outcome.answer,
                "gold": sample.answers,
                "sample_hash": hashes[task, length, index],
                "method_settings": _settings_of(methods[name]),
                **config.settings(),
            }
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
            rows.append(row)
            bar.update()
    return rows


def _settings_of(method: Method) -> dict[str, Any]:
    """The method's settings as a row stores them (JSON round trip: tuples become lists)."""
    settings: dict[str, Any] = json.loads(json.dumps(getattr(method, "settings", {}), sort_keys=True))
    return settings


@contextmanager
def peak_rss(interval: float = 0.02) -> Iterator[list[int]]:
    """Sample this process's resident memory while the block runs; ``[peak bytes]`` is filled on exit.

    The process-wide high-water mark (``ru_maxrss``) never goes down, so it cannot tell one method's
    peak from an earlier one's; a sampling thread can. Child processes are not counted: the LongLLMLingua
    worker stays alive (and holds its copy of the draft) while every other method runs.
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
