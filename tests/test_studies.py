"""The benchmark studies: the draft-cache study (overlap, one row, summary) and the dtype copies."""

from __future__ import annotations

from benchmarks.cache_study import kept_overlap, study_sample, summarize
from draft_rag.bench.tasks import TaskGenerator
from tests.tiny import tiny_model, tiny_tokenizer


def test_kept_overlap():
    assert kept_overlap([[(0, 4)], []], [[(0, 4)], []]) == 1.0
    assert kept_overlap([[(0, 4)]], [[(2, 6)]]) == 2 / 6
    assert kept_overlap([[(0, 2)], []], [[], [(0, 2)]]) == 0.0  # same characters of different documents
    assert kept_overlap([], []) == 1.0


def test_study_row_and_summary():
    draft = tiny_model("qwen2", seed=0)
    sample = TaskGenerator(tiny_tokenizer(), chunk_tokens=64).sample("niah_single", 512, 0)
    row = study_sample(draft, draft.tokenizer, sample, budget=64)
    assert row["documents"] == len(sample.documents) > 1
    assert row["context_tokens"] > 64
    assert min(row["uncached_s"], row["cold_s"], row["warm_s"]) > 0
    assert 0.0 <= row["overlap"] <= 1.0
    assert row["cache_tokens"] >= row["context_tokens"] and row["cache_bytes"] > 0
    table = summarize([row, {**row, "length": 1024}])
    assert table.count("\n") == 4 and "| 512 |" in table and "| 1024 |" in table


def test_dtype_copies_leave_the_fp32_model_alone():
    import torch

    from benchmarks.dtype_study import as_dtype

    base = tiny_model("qwen2", seed=0)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        reference = base.model(ids).logits
        for dtype in ("bfloat16", "int8"):
            copy = as_dtype(base, dtype)
            assert copy.model is not base.model and copy.tokenizer is base.tokenizer
            logits = copy.model(ids).logits.float()
            assert torch.allclose(logits, reference, atol=0.1), dtype
        assert next(as_dtype(base, "bfloat16").model.parameters()).dtype == torch.bfloat16
        assert next(base.model.parameters()).dtype == torch.float32
        assert torch.equal(base.model(ids).logits, reference)


def test_study_log_resumes_from_its_file(tmp_path):
    from benchmarks.study import StudyLog, mean

    log = StudyLog(tmp_path / "out", "rows.jsonl", ("task", "n"))
    assert not log.has(task="a", n=1)
    log.add({"task": "a", "n": 1, "score": 1.0})
    log.add({"task": "a", "n": 2, "score": 0.0})
    again = StudyLog(tmp_path / "out", "rows.jsonl", ("task", "n"))
    assert again.has(task="a", n=1) and again.has(task="a", n=2) and not again.has(task="b", n=1)
    assert mean(again.rows, "score") == 0.5 and mean([], "score") == 0.0
    assert again.summarize("rows.md", lambda rows: f"{len(rows)} rows\n") == "2 rows\n"
    assert (tmp_path / "out" / "rows.md").read_text() == "2 rows\n"


def test_lookahead_study_parses_max_and_orders_rows():
    import argparse

    import pytest

    from benchmarks.lookahead_study import parse_lookahead
    from benchmarks.lookahead_study import summarize as summarize_lookahead

    assert parse_lookahead("max") == "max"
    assert parse_lookahead("16") == 16
    for bad in ("-1", "many"):
        with pytest.raises(argparse.ArgumentTypeError, match="lookahead"):
            parse_lookahead(bad)
    rows = [
        {"task": "qa", "lookahead": la, "score": score, "draft_s": 1.0, "ttft_s": ttft, "total_s": ttft + 1,
         "machine": "x86_64 CPU (avx2), 2 torch threads", "dtype": "float32"}
        for la, score, ttft in (("max", 1.0, 3.0), (64, 1.0, 3.0), (8, 0.0, 2.0), (0, 0.0, 1.5))
    ]
    table, notes = summarize_lookahead(rows).split("\n\n")
    lines = table.splitlines()[2:]
    assert [line.split(" | ")[0] for line in lines] == ["| 0 (SnapKV)", "| 8", "| 64", "| up to max_new_tokens"]
    assert lines[-1].endswith("| 2.00x |")
    assert notes == "Timed on x86_64 CPU (avx2), 2 torch threads, float32.\n"


def test_specpc_tuning_shares_draft_passes_and_resumes(tmp_path, monkeypatch):
    import json

    from benchmarks import specpc_tuning

    draft = tiny_model("qwen2", seed=4)
    monkeypatch.setattr(specpc_tuning, "load_model", lambda *args, **kwargs: draft)
    calls = []
    handle = draft.model.get_decoder().register_forward_pre_hook(lambda *_: calls.append(1))
    argv = ["--tasks", "niah_single", "--length", "512", "--samples", "2", "--budgets", "48", "96",
            "--chunk-tokens", "64", "--out", str(tmp_path), "--variants", "default", "document boundaries",
            "neighbours 16", "question observers"]
    try:
        assert specpc_tuning.main(argv) == 0
        # Per sample one forward pass (a 512-token prompt, no lookahead) for the three variants that read
        # alike, and one for question observers.
        assert len(calls) == 2 * 2
        calls.clear()
        assert specpc_tuning.main(argv) == 0
        assert not calls  # every row is logged: nothing runs again
    finally:
        handle.remove()
    rows = [json.loads(line) for line in (tmp_path / specpc_tuning.RESULTS_FILE).read_text().splitlines()]
    dtype = str(draft.model.dtype).removeprefix("torch.")
    assert len(rows) == 2 * 4 * 2 and {r["dtype"] for r in rows} == {dtype}
    assert all(0.0 <= r["kept"] <= 1.0 and r["seconds"] > 0 for r in rows)
    assert f"| {dtype} | default | 48 | 2 |" in (tmp_path / specpc_tuning.SUMMARY_FILE).read_text()


def test_second_hop_study_smoke_run_resumes_and_refuses_seed_0(tmp_path, capsys):
    import json

    import pytest

    from benchmarks import second_hop_study as study

    with pytest.raises(SystemExit) as refused:
        study.main(["--smoke", "--seed", "0", "--out", str(tmp_path)])
    assert refused.value.code == 2 and "seed 0" in capsys.readouterr().err
    assert study.main(["--smoke", "--out", str(tmp_path)]) == 0
    path = tmp_path / study.RESULTS_FILE
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    smoke = study.SMOKE
    assert len(rows) == len(study.VARIANTS) * len(smoke["tasks"]) * len(smoke["budgets"]) * smoke["samples"]
    assert all(r["seed"] == 1 and r["kept_tokens"] <= r["budget"] and r["seconds"] > 0 for r in rows)
    for row in rows:
        variant = study.VARIANTS[row["variant"]]
        assert (row["warm_s"] > 0) == variant.cache
        assert isinstance(row["draft_answer"], str) == (variant.first_share is not None)
    summary = (tmp_path / study.SUMMARY_FILE).read_text()
    assert "| float32 | specpc | 64 | 2 |" in summary and "| 1.00x |" in summary
    before = path.read_text()
    assert study.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert path.read_text() == before  # every row is logged: nothing runs again


def test_tuning_studies_refuse_seed_0_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import pytest

    from benchmarks import second_hop_study, specpc_tuning

    for study in (specpc_tuning, second_hop_study):
        monkeypatch.setattr(study, "load_model", lambda *args, **kwargs: pytest.fail("no model may load"))
        with pytest.raises(SystemExit) as refused:
            study.main(["--seed", "0", "--out", str(tmp_path)])
        assert refused.value.code == 2
        assert "error: seed 0 is the reported benchmark's seed; tune on another one." in capsys.readouterr().err
