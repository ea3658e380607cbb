"""The benchmark report: Wilson intervals, the summary and both plots."""

from __future__ import annotations

import pytest

from draft_rag.bench.report import (
    PLOT_FILE,
    TIME_PLOT_FILE,
    plot_accuracy,
    plot_accuracy_vs_time,
    wilson_interval,
    write_summary,
)


@pytest.mark.parametrize(
    ("accuracy", "n", "low", "high"),
    [
        # 10 of 100, 5 of 10, 0 of 10, 20 of 20 and 16 of 20, to four places.
        (0.1, 100, 0.0552, 0.1744),
        (0.5, 10, 0.2366, 0.7634),
        (0.0, 10, 0.0, 0.2775),
        (1.0, 20, 0.8389, 1.0),
        (0.8, 20, 0.5840, 0.9193),
    ],
)
def test_wilson_interval_known_values(accuracy, n, low, high):
    assert wilson_interval(accuracy, n) == pytest.approx((low, high), abs=1e-4)


def test_wilson_interval_is_all_of_0_1_without_samples_and_narrows_with_more():
    assert wilson_interval(0.5, 0) == (0.0, 1.0)
    widths = [(lambda w: w[1] - w[0])(wilson_interval(0.7, n)) for n in (5, 20, 80)]
    assert widths == sorted(widths, reverse=True)


def _row(task, method, budget, accuracy, total_s, sample_id=0, length=4096):
    return {"task": task, "length": length, "sample_id": sample_id, "method": method, "budget": budget,
            "accuracy": accuracy, "compress_s": 1.0, "answer_s": total_s - 1.0, "total_s": total_s,
            "peak_rss_mb": 100.0, "kv_bytes": 2**20, "prompt_tokens": 50}


ROWS = [
    row
    for sample in range(3)
    for length in (2048, 4096)
    for row in (
        _row("qa", "full", None, 1.0, 30.0, sample, length),
        *(_row("qa", "specpc", b, float(b >= 512 or sample == 0), 10.0 + b / 100, sample, length) for b in (256, 512)),
        *(_row("qa", "llmlingua", b, 0.0, 60.0, sample, length) for b in (256, 512)),
        *(_row("qa", "speckv", b, 1.0, 25.0, sample, length) for b in (128, 256)),
    )
]


def test_summary_shows_intervals_and_links_both_plots(tmp_path):
    text = write_summary(ROWS, tmp_path, notes=["draft tiny"], skipped={"kvpress": "not installed"}).read_text()
    assert "## 4096 tokens: accuracy (%)" in text and "## 2048 tokens: accuracy (%)" in text
    assert "`kvpress` skipped: not installed" in text
    assert "| full | 100.0 [44, 100] n=3 | 100.0 [44, 100] n=3 |" in text
    assert "| specpc @ 256 | 33.3 [6, 79] n=3 |" in text
    assert f"]({PLOT_FILE})" in text and f"]({TIME_PLOT_FILE})" in text


def test_both_plots_are_written(tmp_path):
    for plot, name in ((plot_accuracy, PLOT_FILE), (plot_accuracy_vs_time, TIME_PLOT_FILE)):
        path = plot(ROWS, tmp_path)
        assert path == tmp_path / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plots_work_with_full_alone(tmp_path):
    only_full = [r for r in ROWS if r["method"] == "full"]
    assert plot_accuracy(only_full, tmp_path).exists()
    assert plot_accuracy_vs_time(only_full, tmp_path).exists()


def test_paired_differences_know_their_mean_and_cover_it():
    from draft_rag.bench.report import paired_differences

    assert paired_differences([(1.0, 1.0)] * 5) == (0.0, 0.0, 0.0)
    assert paired_differences([(1.0, 0.0)] * 4) == (100.0, 100.0, 100.0)
    diff, low, high = paired_differences([(1.0, 0.0)] * 6 + [(0.0, 1.0)] * 2 + [(0.5, 0.5)] * 12)
    assert diff == pytest.approx(20.0) and low < diff < high and low > -100 and high < 100
    assert paired_differences([]) == (0.0, 0.0, 0.0)


def _paired_rows(rows):
    """The paired table's rows at 4096 tokens, and the label each starts with."""
    from draft_rag.bench.report import paired_table

    lines = paired_table(rows, 4096).splitlines()[2:]
    return lines, [line.split(" | ")[0].lstrip("| ") for line in lines]


def test_paired_table_compares_each_reference_with_its_side_at_the_same_budget():
    lines, labels = _paired_rows(ROWS)
    assert labels == [
        "specpc @ 256 vs full", "specpc @ 256 vs llmlingua @ 256",
        "specpc @ 512 vs full", "specpc @ 512 vs llmlingua @ 512",
        "speckv @ 128 vs full", "speckv @ 256 vs full",
    ]
    # specpc @ 256 is right on sample 0 only; llmlingua never: 1 better, 2 ties, mean +33.3 points.
    assert lines[1].startswith("| specpc @ 256 vs llmlingua @ 256 | 3 | 1 | 2 | 0 | +33.3 [")
    assert lines[0].startswith("| specpc @ 256 vs full | 3 | 0 | 1 | 2 | -66.7 [")


def test_complete_samples_keep_only_samples_every_setting_answered():
    from draft_rag.bench.report import complete_samples

    # Sample 2 at 4096 tokens lacks llmlingua @ 512: its rows go; every 2048 sample is complete.
    rows = [r for r in ROWS if not (r["length"] == 4096 and r["sample_id"] == 2 and r["method"] == "llmlingua"
                                    and r["budget"] == 512)]
    kept, left_out = complete_samples(rows)
    assert left_out == 6 and len(kept) == len(rows) - 6
    assert {(r["length"], r["sample_id"]) for r in kept} == {(2048, 0), (2048, 1), (2048, 2), (4096, 0), (4096, 1)}
    assert complete_samples(ROWS) == (ROWS, 0)


def test_a_method_run_on_one_task_leaves_the_other_tasks_complete():
    from draft_rag.bench.report import complete_samples

    other_task = [{**r, "task": "two_hop"} for r in ROWS if r["length"] == 4096]
    # A method run on two_hop's samples 0 and 1 only: two_hop's sample 2 is incomplete, qa's samples are not.
    extra = [{**r, "method": "specpc-question"} for r in other_task if r["method"] == "specpc" and r["sample_id"] < 2]
    rows = ROWS + other_task + extra
    kept, left_out = complete_samples(rows)
    assert left_out == len([r for r in other_task if r["sample_id"] == 2])
    assert {(r["task"], r["sample_id"]) for r in kept if r["length"] == 4096} == {
        ("qa", 0), ("qa", 1), ("qa", 2), ("two_hop", 0), ("two_hop", 1)}


def _of_run(rows, dtype, machine):
    return [{**row, "dtype": dtype, "machine": machine} for row in rows]


def test_rows_of_two_runs_share_the_accuracy_table_but_not_the_seconds(tmp_path):
    from draft_rag.bench.report import accuracy_table, complete_samples

    bf16 = _of_run([r for r in ROWS if r["length"] == 4096 and r["sample_id"] < 2], "bfloat16", "machine A")
    # Run B has samples 2-4, no llmlingua, and everything twice as slow.
    fp32 = _of_run([{**r, "sample_id": r["sample_id"] + 2, "total_s": 2 * r["total_s"],
                     "answer_s": 2 * r["total_s"] - 1.0}
                    for r in ROWS if r["length"] == 4096 and r["method"] != "llmlingua"], "float32", "machine B")
    rows = bf16 + fp32
    # Run B's samples are complete without llmlingua: completeness is judged within each run.
    assert complete_samples(rows) == (rows, 0)
    table = accuracy_table(rows, 4096)
    assert "| full | 100.0 [57, 100] n=5 |" in table
    assert "| llmlingua @ 256 | 0.0 [0, 66] n=2 |" in table
    text = write_summary(rows, tmp_path).read_text()
    assert "## 4096 tokens: latency and memory (bfloat16 on machine A)" in text
    assert "## 4096 tokens: latency and memory (float32 on machine B)" in text
    sections = text.split("## 4096 tokens: latency and memory")
    # Each run's mean seconds are its own: full takes 30 s on A and 60 s on B.
    assert "| full | 1.00x | 1.00x | 1.00 | 29.00 | 30.00 |" in sections[1]
    assert "| full | 1.00x | 1.00x | 1.00 | 59.00 | 60.00 |" in sections[2]
    assert "llmlingua" not in sections[2].split("## ")[0]
    assert plot_accuracy_vs_time(rows, tmp_path).read_bytes()[:4] == b"\x89PNG"


def test_rows_of_one_run_keep_the_plain_latency_heading(tmp_path):
    text = write_summary(_of_run(ROWS, "bfloat16", "machine A"), tmp_path).read_text()
    assert text.count("tokens: latency and memory\n") == 2 and "latency and memory (" not in text


def test_specpc_variants_are_paired_with_specpc_and_the_embedding_filter():
    from draft_rag.bench.report import latency_table

    rows = [r for r in ROWS if r["length"] == 4096 and r["method"] in ("full", "specpc")]
    # specpc-cached loses sample 1 at 512 tokens; the embedding filter is right on sample 2 only.
    rows += [{**r, "method": "specpc-cached", "accuracy": 0.0 if (r["sample_id"], r["budget"]) == (1, 512)
              else r["accuracy"], "warm_s": 4.0} for r in ROWS if r["length"] == 4096 and r["method"] == "specpc"]
    rows += [{**r, "method": "embedding", "accuracy": float(r["sample_id"] == 2)}
             for r in ROWS if r["length"] == 4096 and r["method"] == "specpc"]
    lines, labels = _paired_rows(rows)
    assert labels == [
        "specpc @ 256 vs full", "specpc @ 256 vs embedding @ 256",
        "specpc @ 512 vs full", "specpc @ 512 vs embedding @ 512",
        "specpc-cached @ 256 vs specpc @ 256", "specpc-cached @ 256 vs embedding @ 256",
        "specpc-cached @ 512 vs specpc @ 512", "specpc-cached @ 512 vs embedding @ 512",
    ]
    assert lines[6].startswith("| specpc-cached @ 512 vs specpc @ 512 | 3 | 0 | 2 | 1 | -33.3 [")
    # The warm seconds have their own column; rows made before it existed count none.
    table = latency_table(rows, 4096).splitlines()
    assert table[0].endswith("| peak RSS MiB | warm s |")
    cached = next(line for line in table if line.startswith("| specpc-cached @ 256 |"))
    plain = next(line for line in table if line.startswith("| specpc @ 256 |"))
    assert cached.endswith("| 4.00 |") and plain.endswith("| 0.00 |")
