"""The gateway benchmark's script, end to end in its smoke mode (tiny draft, stub upstream on loopback)."""

from __future__ import annotations

import json

from benchmarks import gateway_bench


def test_smoke_run_writes_both_parts(tmp_path):
    assert gateway_bench.main(["--smoke", "--rounds", "3", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / gateway_bench.RESULTS_FILE).read_text().splitlines()]
    questions = [r for r in rows if r["part"] == "questions"]
    assert [(r["path"], r["index"]) for r in questions] == [
        (path, index) for path in ("full context", "gateway") for index in range(3)]
    for row in questions:
        assert row["seconds"] > 0 and row["answer"] == "ok"
    for row in (r for r in questions if r["path"] == "gateway"):
        # The smoke budget is 128 tokens; the warmed draft cache answers every chunk lookup.
        assert row["context_tokens_after"] <= 128 < row["context_tokens_before"]
        assert row["cache_misses"] == 0 and row["cache_hits"] > 0
    overheads = [r for r in rows if r["part"] == "overhead"]
    assert len(overheads) == 2 * 2 * 3
    for row in overheads:
        if row["path"] == "gateway" and row["case"] == "budget above the context":
            # The documents fit: SpecPC counts them and hands them back without running the draft.
            assert row["context_tokens_after"] == row["context_tokens_before"] > 128
            assert row["cache_hits"] == row["cache_misses"] == 0
        else:
            assert "context_tokens_after" not in row
    assert all(r["setup"]["budget"] == 128 for r in rows)
    summary = (tmp_path / gateway_bench.SUMMARY_FILE).read_text()
    assert "## (a)" in summary and "## (b)" in summary
    assert summary.count("| How ") == 3
    assert "| no documents | 3 |" in summary and "| budget above the context | 3 |" in summary
