"""What the study scripts share: a JSON-lines log of rows that a rerun resumes, and a markdown summary.

Each study (``cache_study``, ``lookahead_study``, ``memory_study``, ``specpc_tuning``...) measures one thing
in one process and appends a row as soon as it is made, so an interrupted run loses at most the row it was
working on; a rerun skips the rows whose key is already in the file.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from draft_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET, load_model

if TYPE_CHECKING:
    from draft_rag.models import LoadedModel

Row = dict[str, Any]


class StudyLog:
    """The rows of ``out/results_file``: loaded at start, appended to as they are made.

    Args:
        out: the output directory (created).
        results_file: the JSON-lines file name in it.
        key: the fields that identify a row; :meth:`has` compares them.
    """

    def __init__(self, out: Path, results_file: str, key: Sequence[str]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.path = out / results_file
        self.key = tuple(key)
        self.rows: list[Row] = (
            [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            if self.path.exists() else []
        )
        self._done = {self._key(row) for row in self.rows}

    def has(self, **fields: Any) -> bool:
        """Whether a row with these key fields is already logged."""
        return tuple(fields.get(name) for name in self.key) in self._done

    def add(self, row: Row) -> None:
        """Log ``row`` (appended to the file at once)."""
        self.rows.append(row)
        self._done.add(self._key(row))
        with open(self.path, "a", encoding="utf-8") as sink:
            sink.write(json.dumps(row) + "\n")

    def summarize(self, summary_file: str, summarize: Callable[[list[Row]], str]) -> str:
        """Write ``summarize(rows)`` to ``out/summary_file``, print it and return it."""
        table = summarize(self.rows)
        (self.out / summary_file).write_text(table)
        print(table)
        return table

    def _key(self, row: Row) -> tuple[Any, ...]:
        return tuple(row.get(name) for name in self.key)


def add_model_options(parser: argparse.ArgumentParser, *, target: bool = True) -> None:
    """``--draft``, ``--target``, ``--dtype`` and ``--out``, as every study takes them; ``target=False`` leaves
    out ``--target``, for the studies that run the draft alone."""
    parser.add_argument("--draft", default=DEFAULT_DRAFT)
    if target:
        parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))


def refuse_benchmark_seed(parser: argparse.ArgumentParser, seed: int) -> None:
    """Stop with a usage error if ``seed`` is 0: the reported benchmark's samples must not be tuned on."""
    if seed == 0:
        parser.error("seed 0 is the reported benchmark's seed; tune on another one.")


def load_pair(args: argparse.Namespace) -> tuple[LoadedModel, LoadedModel]:
    """The target and the draft that :func:`add_model_options` named."""
    return load_model(args.target, dtype=args.dtype), load_model(args.draft, dtype=args.dtype)


def mean(rows: Iterable[Row], field: str) -> float:
    """The mean of ``field`` over ``rows`` (0 for none)."""
    values = [row[field] for row in rows]
    return sum(values) / len(values) if values else 0.0
