from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field, replace

import pytest

from draft_rag.bench.methods import Outcome, build_methods
from draft_rag.bench.report import accuracy_table, latency_table
from draft_rag.bench.runner import (
    RESULTS_FILE,
    SETTINGS,
    BenchConfig,
    latest_rows,
    plan,
    read_rows,
    run_bench,
    same_settings,
)
from draft_rag.bench.tasks import TaskGenerator
from tests.tiny import tiny_tokenizer


@dataclass
class FakeMethod:
    """Answers correctly when the budget is at least ``needs`` (always for the unbudgeted reference)."""

    name: str
    needs: int = 0
    budgeted: bool = True
    settings: dict = field(default_factory=dict)
    calls: list[tuple[str, int, int | None]] = field(default_factory=list)

    def run(self, sample, budget):
        self.calls.append((sample.task, sample.sample_id, budget))
        right = budget is None or budget >= self.needs
        answer = " ".join(sample.answers) if right else "no idea"
        return Outcome(answer, 0.5 if self.budgeted else 0.0, 1.0, 100, 2048, budget or 900)


def _methods():
    return {"full": FakeMethod("full", budgeted=False), "specpc": FakeMethod("specpc", needs=128),
            "speckv": FakeMethod("speckv")}


def _run(config, directory, methods=None):
    """``run_bench`` on tiny samples, without progress bars: its rows, and the methods it ran (fresh fakes unless
    given), whose ``calls`` say what it computed."""
    methods = _methods() if methods is None else methods
    rows = run_bench(config, methods, TaskGenerator(tiny_tokenizer(), chunk_tokens=64), directory, progress=False)
    return rows, methods


CONFIG = BenchConfig(tasks=["niah_single", "qa"], lengths=[600], budgets=[64, 128], kv_budgets=[32], samples=2)


def test_plan_runs_full_once_per_sample_and_kv_methods_at_kv_budgets():
    jobs = plan(CONFIG, _methods())
    assert len(jobs) == 2 * 2 * (1 + 2 + 1)
    assert sum(job[3] == "full" for job in jobs) == 4
    assert {job[4] for job in jobs if job[3] == "speckv"} == {32}
    # Sample-major: all of sample 0 before any of sample 1.
    assert max(i for i, job in enumerate(jobs) if job[2] == 0) < min(i for i, job in enumerate(jobs) if job[2] == 1)


def test_rows_are_written_and_a_rerun_recomputes_nothing(tmp_path):
    rows, _ = _run(CONFIG, tmp_path)
    assert len(rows) == 16 == len(read_rows(tmp_path / RESULTS_FILE))
    keys = {"task", "length", "sample_id", "method", "budget", "accuracy", "compress_s", "answer_s",
            "peak_rss_mb", "kv_bytes", "prompt_tokens", "answer"}
    assert keys <= set(rows[0])
    by_setting = {(r["method"], r["budget"]): r["accuracy"] for r in rows if r["task"] == "niah_single"}
    assert by_setting[("specpc", 64)] == 0.0 and by_setting[("specpc", 128)] == 1.0
    assert by_setting[("full", None)] == 1.0

    rerun, again = _run(CONFIG, tmp_path)
    assert len(rerun) == 16
    assert all(not m.calls for m in again.values())


def test_an_interrupted_run_resumes_with_the_missing_rows(tmp_path):
    _run(CONFIG, tmp_path)
    path = tmp_path / RESULTS_FILE
    lines = path.read_text().splitlines()
    # Drop the last three rows and leave a half-written line, as a killed run would.
    path.write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:20])
    rows, methods = _run(CONFIG, tmp_path)
    assert sum(len(m.calls) for m in methods.values()) == 3
    assert len(rows) == 16
    assert len({(r["task"], r["sample_id"], r["method"], r["budget"]) for r in rows}) == 16


NAMED = replace(CONFIG, draft="draft-a", target="target-a", machine="x86_64 CPU (avx512_bf16), 2 torch threads")


@pytest.mark.parametrize(
    "change",
    [{"draft": "draft-b"}, {"target": "target-b"}, {"dtype": "bfloat16"}, {"seed": 1}, {"chunk_tokens": 128},
     {"max_new_tokens": 8}, {"machine": "x86_64 CPU (avx2), 2 torch threads"}],
)
def test_rows_of_other_settings_are_not_reused(tmp_path, capsys, change):
    first, _ = _run(NAMED, tmp_path)
    assert all(row[name] == getattr(NAMED, name) for row in first for name in SETTINGS)
    other = replace(NAMED, **change)
    rows, methods = _run(other, tmp_path)
    assert sum(len(m.calls) for m in methods.values()) == 16
    assert len(rows) == 16 and all(same_settings(row, other) for row in rows)
    assert len(read_rows(tmp_path / RESULTS_FILE)) == 32  # the first run's rows are kept
    err = capsys.readouterr().err
    assert "16 rows" in err and f"differ from this run in {next(iter(change))} (" in err
    rerun, again = _run(NAMED, tmp_path)
    assert len(rerun) == 16
    assert all(not m.calls for m in again.values())


def test_rows_that_do_not_record_every_setting_are_recomputed(tmp_path):
    _run(NAMED, tmp_path)
    path = tmp_path / RESULTS_FILE
    old = [{k: v for k, v in row.items() if k not in ("chunk_tokens", "max_new_tokens")} for row in read_rows(path)]
    path.write_text("".join(json.dumps(row) + "\n" for row in old))
    rows, methods = _run(NAMED, tmp_path)
    assert sum(len(m.calls) for m in methods.values()) == 16
    assert all(row["max_new_tokens"] is None and row["chunk_tokens"] == 256 for row in rows)
    # --report-only reads the file whole but keeps only the latest row of each job.
    assert len(read_rows(path)) == 32
    table = accuracy_table(latest_rows(read_rows(path)), 600)
    assert table.splitlines()[2].startswith("| full | 100.0 [34, 100] n=2 |")


def test_rows_of_a_changed_sample_or_method_setting_are_recomputed(tmp_path, capsys):
    _run(NAMED, tmp_path)
    path = tmp_path / RESULTS_FILE
    # A task generator that changed since: one sample's fingerprint no longer matches.
    rows = read_rows(path)
    for row in rows:
        if (row["task"], row["sample_id"]) == ("qa", 1):
            row["sample_hash"] = "0" * 16
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    _, methods = _run(NAMED, tmp_path)
    assert sorted({(c[0], c[1]) for m in methods.values() for c in m.calls}) == [("qa", 1)]
    assert sum(len(m.calls) for m in methods.values()) == 4  # full, specpc x 2 budgets, speckv
    assert "4 rows" in capsys.readouterr().err
    # A method whose settings changed reruns; the others do not.
    methods = _methods()
    methods["specpc"].settings = {"kernel_size": 32}
    _run(NAMED, tmp_path, methods)
    assert len(methods["specpc"].calls) == 8 and not methods["full"].calls and not methods["speckv"].calls


def test_full_runs_once_per_sample_and_is_reused_when_budgets_are_added(tmp_path):
    _run(CONFIG, tmp_path)
    rows, methods = _run(replace(CONFIG, budgets=[64, 128, 256], kv_budgets=[32, 16]), tmp_path)
    assert not methods["full"].calls
    assert sorted(c[2] for c in methods["specpc"].calls) == [256] * 4
    assert sorted(c[2] for c in methods["speckv"].calls) == [16] * 4
    assert sum(r["method"] == "full" for r in rows) == 4


def test_rows_of_methods_outside_the_run_stay_in_its_results(tmp_path):
    _run(CONFIG, tmp_path)
    rows, only_full = _run(CONFIG, tmp_path, {"full": FakeMethod("full", budgeted=False)})
    assert not only_full["full"].calls and len(rows) == 16


def _row(task, method, budget, accuracy, total_s, sample_id=0):
    return {"task": task, "length": 4096, "sample_id": sample_id, "method": method, "budget": budget,
            "accuracy": accuracy, "compress_s": 0.0, "answer_s": total_s, "total_s": total_s,
            "peak_rss_mb": 100.0, "kv_bytes": 2**20, "prompt_tokens": 50}


ROWS = [
    _row("qa", "full", None, 1.0, 10.0), _row("qa", "full", None, 1.0, 30.0, sample_id=1),
    _row("qa", "specpc", 512, 1.0, 4.0), _row("qa", "specpc", 512, 0.0, 6.0, sample_id=1),
    _row("vt", "full", None, 0.5, 20.0), _row("vt", "specpc", 512, 0.25, 5.0),
]


def test_accuracy_table_averages_per_task_and_method_with_wilson_intervals():
    table = accuracy_table(ROWS, 4096)
    lines = table.splitlines()
    assert lines[0] == "| method @ budget | qa | vt | mean |"
    # Wilson 95%: 2 of 2 -> [34, 100]; one sample at 0.5 -> [5, 95]; the mean counts all 3 samples.
    assert lines[2] == "| full | 100.0 [34, 100] n=2 | 50.0 [5, 95] n=1 | 75.0 [26, 96] n=3 |"
    assert lines[3] == "| specpc @ 512 | 50.0 [9, 91] n=2 | 25.0 [1, 88] n=1 | 37.5 [8, 81] n=3 |"


def test_latency_ratios_use_the_same_samples_as_full():
    line = latency_table(ROWS, 4096).splitlines()[3]
    # specpc: (4 + 6 + 5) s over full's (10 + 30 + 20) s on the same three samples.
    assert line.startswith("| specpc @ 512 | 0.25x | 0.25x |")


PEAK_PROBE = """
import mmap, time
from draft_rag.bench.runner import peak_rss

with peak_rss(interval=0.001) as peak:
    before = peak[0]
    # A fresh anonymous mapping, every page written: new resident memory that no allocator can recycle.
    block = mmap.mmap(-1, 64 * 2**20)
    block.write(b"\\x01" * len(block))
    deadline = time.monotonic() + 2.0  # live until sampled (at most 2 s), even on a loaded machine
    while peak[0] < before + 48 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.005)
    block.close()
print(peak[0] - before)
"""


def test_peak_rss_sees_a_short_lived_allocation():
    # In a fresh process: in a long test run that holds several models, memory freed elsewhere and pages
    # the kernel reclaims can hide a 64 MiB rise of the resident set.
    done = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, timeout=120, check=True)
    assert int(done.stdout.strip()) >= 48 * 2**20


def test_build_methods_rejects_unknown_names_and_explains_skips(tiny_pair):
    draft, target = tiny_pair
    with pytest.raises(ValueError, match="Unknown method"):
        build_methods(["specpc", "magic"], draft=draft, target=target)
    methods, skipped = build_methods(["truncate", "llmlingua"], draft=draft, target=target)
    assert list(methods) == ["full", "truncate"]
    # Whether or not the LongLLMLingua environment exists, a draft built in memory cannot be loaded there.
    assert "llmlingua" in skipped


def test_results_rows_are_json_lines(tmp_path):
    _run(CONFIG, tmp_path)
    for line in (tmp_path / RESULTS_FILE).read_text().splitlines():
        assert isinstance(json.loads(line)["accuracy"], float)


@pytest.mark.parametrize("name", ["specpc", "specpc-paper", "snapkv-pc", "specpc-apart"])
def test_specpc_budgets_of_a_sample_share_one_draft_pass(tiny_pair, name):
    from draft_rag import SpecPC
    from draft_rag.bench.methods import SNAPKV_PC_SETTINGS, SPECPC_JOINT_SETTINGS, SPECPC_PAPER_SETTINGS
    from draft_rag.bench.tiny import TINY_SPECPC_SETTINGS

    draft, target = tiny_pair
    methods, _ = build_methods([name], draft=draft, target=target, specpc_settings=TINY_SPECPC_SETTINGS)
    generator = TaskGenerator(target.tokenizer, chunk_tokens=64)
    variant = {"specpc": SPECPC_JOINT_SETTINGS, "specpc-paper": {**SPECPC_JOINT_SETTINGS, **SPECPC_PAPER_SETTINGS},
               "snapkv-pc": {**SPECPC_JOINT_SETTINGS, **SNAPKV_PC_SETTINGS}, "specpc-apart": {}}[name]
    settings = {**TINY_SPECPC_SETTINGS, **variant}
    calls = []
    handle = draft.model.get_decoder().register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        for index in (0, 1):
            sample = generator.sample("niah_single", 600, index)
            before = len(calls)
            first = methods[name].run(sample, 64)
            read = len(calls)
            second = methods[name].run(sample, 128)
            assert read > before and len(calls) == read  # the draft reads each sample once, for both budgets
            for budget, outcome in ((64, first), (128, second)):
                alone = SpecPC(draft=draft, budget=budget, target_tokenizer=target.tokenizer, progress=False,
                               **settings).compress(sample.question, sample.documents)
                assert outcome.context_tokens == alone.total_kept_tokens
            draft_pass = methods[name]._compressors[128].latest["context"].seconds
            assert min(first.compress_s, second.compress_s) >= draft_pass > 0  # each budget pays for the pass
            del calls[read:]  # the fresh compressions above ran the draft too
    finally:
        handle.remove()


def test_specpc_variants_that_read_alike_share_the_draft_pass_and_others_do_not(tiny_pair):
    from draft_rag import SpecPC
    from draft_rag.bench.methods import SPECPC_PAPER_SETTINGS
    from draft_rag.bench.tiny import TINY_SPECPC_SETTINGS

    draft, target = tiny_pair
    names = ["specpc", "specpc-paper", "snapkv-pc"]
    methods, _ = build_methods(names, draft=draft, target=target, specpc_settings=TINY_SPECPC_SETTINGS)
    sample = TaskGenerator(target.tokenizer, chunk_tokens=64).sample("niah_multikey", 600, 0)
    calls = []
    handle = draft.model.get_decoder().register_forward_pre_hook(lambda *_: calls.append(len(calls)))
    try:
        counts = []
        for name in names:
            before = len(calls)
            outcome = methods[name].run(sample, 96)
            counts.append(len(calls) - before)
            if name == "specpc-paper":
                alone = SpecPC(draft=draft, budget=96, target_tokenizer=target.tokenizer, progress=False,
                               **{**TINY_SPECPC_SETTINGS, **SPECPC_PAPER_SETTINGS})
                assert outcome.context_tokens == alone.compress(sample.question, sample.documents).total_kept_tokens
    finally:
        handle.remove()
    # specpc reads; specpc-paper (pooling across documents, the same reading) reuses it; snapkv-pc reads anew.
    assert counts[0] > 0 and counts[1] == 0 and counts[2] > 0


def test_rows_record_every_method_knob_defaults_included(tiny_pair):
    draft, target = tiny_pair
    methods, _ = build_methods(["specpc", "specpc-paper", "snapkv-pc", "speckv", "truncate"], draft=draft,
                               target=target)
    assert methods["specpc"].settings["document_boundaries"] is True
    paper = {"document_boundaries": False, "kernel_size": 64, "neighbor_tokens": 64}
    assert methods["specpc-paper"].settings == {**methods["specpc"].settings, **paper}
    assert methods["snapkv-pc"].settings["window_size"] == 32 and methods["specpc"].settings["window_size"] == 64
    assert methods["speckv"].settings["lookahead_tokens"] is None and methods["speckv"].settings["method"] == "speckv"
    assert methods["truncate"].settings == {} and methods["full"].settings == {}


def test_report_only_drops_rows_of_a_method_configuration_that_a_later_run_replaced():
    old = {"task": "qa", "length": 600, "method": "specpc", "budget": 64, "accuracy": 0.0, "seed": 0,
           "method_settings": {"kernel_size": 64}}
    rows = [
        {**old, "sample_id": 0}, {**old, "sample_id": 1},
        {**old, "sample_id": 0, "accuracy": 1.0, "method_settings": {"kernel_size": 8}},
        {**old, "method": "full", "budget": None, "sample_id": 1, "method_settings": {}},
    ]
    kept = latest_rows(rows)
    # specpc's sample 1 was made with the old kernel and not yet redone: it drops out rather than mix in.
    assert sorted((r["method"], r["sample_id"], r["accuracy"]) for r in kept) == [("full", 1, 0.0), ("specpc", 0, 1.0)]


def test_merge_runs_takes_each_sample_from_the_run_with_most_of_its_rows():
    from draft_rag.bench.runner import merge_runs

    def rows(run, sample_id, count):
        return [{"task": "qa", "length": 4096, "sample_id": sample_id, "method": f"m{i}", "budget": None,
                 "run": run} for i in range(count)]

    first = rows("a", 0, 3) + rows("a", 1, 2) + rows("a", 2, 3)
    second = rows("b", 1, 3) + rows("b", 2, 3) + rows("b", 3, 1)
    taken = merge_runs([first, second])
    by_sample = {(r["sample_id"], r["run"]) for part in taken for r in part}
    # Sample 1: b has more rows; sample 2: a tie, the first run wins; samples 0 and 3: the only run.
    assert by_sample == {(0, "a"), (1, "b"), (2, "a"), (3, "b")}
    assert [len(part) for part in taken] == [6, 4]
    assert merge_runs([first]) == [first]


@pytest.mark.parametrize("results", ["docs/bench/results.jsonl", "docs/bench/fp32/results.jsonl",
                                     "docs/bench/book_qa/results.jsonl"])
def test_the_committed_rows_name_every_knob_the_methods_have_now(tiny_pair, results):
    """A knob added to a method must be written into the committed rows with the value they were made with,
    or a resumed sitting would take every row as stale and run it all again."""
    from pathlib import Path

    from draft_rag.bench.methods import KV_METHODS
    from draft_rag.bench.runner import _settings_of

    path = Path(__file__).resolve().parent.parent / results
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    names = sorted({r["method"] for r in rows} - {"llmlingua", *KV_METHODS})
    methods, _ = build_methods(names, draft=tiny_pair[0], target=tiny_pair[1])
    for name, method in methods.items():
        made_with = {frozenset(r["method_settings"]) for r in rows if r["method"] == name}
        assert made_with == {frozenset(_settings_of(method))}, name
