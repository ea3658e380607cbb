"""The GPU study runs end to end at tiny shapes on the CPU (``--smoke``), and builds its models from real configs."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_study
from draft_rag.bench.hardware import hardware_label
from draft_rag.bench.tiny import tiny_tokenizer

# Parameter counts of the public Qwen2.5 models the configs describe.
SIZES = {"qwen2.5-0.5b-instruct": 0.494e9, "qwen2.5-7b-instruct": 7.62e9, "qwen2.5-14b-instruct": 14.77e9}


@pytest.mark.parametrize("name", list(SIZES))
def test_configs_have_the_real_models_sizes(name):
    config = gpu_study.model_config(name)
    assert config.max_position_embeddings >= max(gpu_study.LENGTHS) + 512
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(SIZES[name], rel=0.005)


def test_random_model_is_materialized_on_the_device_with_real_weights():
    loaded = gpu_study.random_model("qwen2.5-7b-instruct", tiny_tokenizer(), "cpu", torch.bfloat16, smoke=True)
    model = loaded.model
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.vocab_size == 152064 and model.config.num_hidden_layers == 2
    # Initialized, not left as whatever memory to_empty handed out: norms at 1, projections small and random.
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert 0.01 < model.model.layers[0].mlp.up_proj.weight.float().std() < 0.05
    rotary = model.model.rotary_emb.inv_freq
    assert rotary[0] == 1 and torch.all(rotary[1:] < rotary[:-1])
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_smoke_run_writes_rows_and_the_report(tmp_path):
    assert gpu_study.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / gpu_study.RESULTS_FILE).read_text().splitlines()]
    measures = [(row["measure"], row["model"], row["config"]) for row in rows]
    assert measures[:3] == [("specpc", "qwen2.5-0.5b-instruct", config)
                            for config in ("uncached", "encode documents", "warm cache")]
    for target in gpu_study.TARGET_CONFIGS:
        assert ("speckv", target, "full, sdpa") in measures and ("speckv", target, "speckv @ 64, sdpa") in measures
        assert ("sparse", target, "dense") in measures and ("sparse", target, "sparse 64/64, sdpa") in measures
    engine_configs = ["one at a time", *(f"{n} concurrent" for n in gpu_study.ENGINE_CONCURRENCY)]
    for target in gpu_study.TARGET_CONFIGS:
        engine = [row for row in rows if row["measure"] == "engine" and row["model"] == target]
        assert [row["config"] for row in engine] == engine_configs
        assert [row["requests"] for row in engine] == [gpu_study.ENGINE_BASELINE_REQUESTS,
                                                       *gpu_study.ENGINE_CONCURRENCY]
        # Every request generates (up to) 4 tokens; concurrent requests are answered in batches.
        assert all(0 < row["completion_tokens"] <= 4 * row["requests"] and row["tokens_per_s"] > 0 for row in engine)
        assert all(1 <= row["mean_batch_size"] <= row["requests"] for row in engine)
        assert engine[-1]["mean_batch_size"] > 1
    assert len(rows) == 3 + 8 * len(gpu_study.TARGET_CONFIGS)
    assert all(row["length"] == 512 and row["prompt_tokens"] > 400 for row in rows)
    assert {row["device"] for row in rows} == {hardware_label("cpu")}
    speckv = [row for row in rows if row["config"] == "speckv @ 64, sdpa"]
    assert all(row["kv_entries_kept"] == 64 and row["ttft_s"] > 0 for row in speckv)
    report = (tmp_path / gpu_study.SUMMARY_FILE).read_text()
    assert rows[0]["device"] in report and "accuracy is not measured" in report and "not measured yet" not in report
    assert "## engine" in report and "tok/s / one at a time" in report
    # A rerun finds every row done and only rewrites the report.
    assert gpu_study.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert len((tmp_path / gpu_study.RESULTS_FILE).read_text().splitlines()) == len(rows)
