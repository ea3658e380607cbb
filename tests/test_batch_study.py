"""The batch study on tiny models: rows per method and batch size, and batched texts equal single calls'."""

from __future__ import annotations

import json

from benchmarks.batch_study import RESULTS_FILE, SUMMARY_FILE, main


def test_batch_study_writes_rows_and_table(tmp_path, capsys):
    argv = ["--tiny", "--length", "300", "--prompts", "3", "--batch-sizes", "2", "--max-new-tokens", "4",
            "--tasks", "niah_single",
            "--budget", "64", "--methods", "speckv", "full", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / RESULTS_FILE).read_text().splitlines()]
    assert [(r["method"], r["batch_size"]) for r in rows] == [("speckv", 1), ("speckv", 2), ("full", 1), ("full", 2)]
    assert all(r["texts_differing"] == 0 and r["sequences_per_s"] > 0 and r["peak_kv_bytes"] > 0 for r in rows)
    assert rows[0]["peak_kv_bytes"] < rows[2]["peak_kv_bytes"]  # SpecKV never holds a full prompt cache
    table = (tmp_path / SUMMARY_FILE).read_text()
    assert table.count("| 3/3 |") == 4 and "| speckv | 2 | 3 |" in table
    assert "speckv batch 2" in capsys.readouterr().out
