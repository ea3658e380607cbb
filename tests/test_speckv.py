"""The SpecKV engine on tiny random models: exact without eviction, eviction invariants, decoding features."""

from __future__ import annotations

import pytest
import torch

from draft_rag.decoding import as_messages, chat_prompt_ids
from draft_rag.engine import SpecKV
from draft_rag.kv import METHODS, SpecKVEviction
from draft_rag.models import stop_token_ids

PROSE = (
    "Retrieval augmented generation reads long documents, and a small draft model decides which tokens "
    "matter. The quick brown fox jumps over the lazy dog. "
)
LONG_PROMPT = (
    PROSE * 6 + "A special magic number is hidden in the text: 4071. What is the special magic number?"
)


def plain_generate(loaded, prompt, max_new_tokens):
    ids = chat_prompt_ids(loaded.tokenizer, as_messages(prompt))
    out = loaded.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop_token_ids(loaded),
        pad_token_id=loaded.tokenizer.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_budget_above_prompt_length_equals_plain_generate(method, arch, tiny_qwen, tiny_llama, tiny_pair):
    target = tiny_qwen if arch == "qwen2" else tiny_llama
    engine = SpecKV(target=target, draft=tiny_pair[0], method=method, budget=4096, window_size=8)
    result = engine.generate(LONG_PROMPT, max_new_tokens=24)
    expected = plain_generate(target, LONG_PROMPT, 24)
    assert result.token_ids == expected
    assert result.kv_entries_kept == result.kv_entries_full == result.prompt_tokens
    assert result.kv_bytes_kept == result.kv_bytes_full


@pytest.mark.parametrize("method", ["speckv", "snapkv", "streamingllm"])
def test_eviction_keeps_budget_and_decodes_long(method, tiny_pair):
    draft, target = tiny_pair
    budget = 40
    engine = SpecKV(target=target, draft=draft, method=method, budget=budget, window_size=8)
    result = engine.generate(LONG_PROMPT, max_new_tokens=60, temperature=1.0, seed=0)
    assert result.prompt_tokens > 3 * budget
    assert result.kv_entries_kept == budget
    assert result.kv_entries_full == result.prompt_tokens
    config = target.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_entry = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4
    assert result.kv_bytes_kept == budget * per_entry
    assert result.kv_bytes_full == result.prompt_tokens * per_entry
    stops = set(stop_token_ids(target))
    assert len(result.token_ids) == 60 or result.token_ids[-1] in stops
    assert len(result.token_ids) >= 50


def test_speckv_runs_the_draft_only_when_it_evicts(tiny_pair):
    draft, target = tiny_pair
    short = SpecKV(target=target, draft=draft, budget=4096).generate(
        "What is the magic number?", max_new_tokens=4
    )
    assert short.timings["draft_s"] < 0.05
    timings = SpecKV(target=target, draft=draft, budget=40, window_size=8).generate(
        LONG_PROMPT, max_new_tokens=4
    )
    assert set(timings.timings) == {"compress_s", "draft_s", "prefill_s", "ttft_s", "decode_s", "tokens_per_s"}
    assert timings.timings["ttft_s"] >= timings.timings["draft_s"] + timings.timings["prefill_s"]


def test_draft_with_another_tokenizer(tiny_qwen):
    """The draft answer is passed as text, so a draft with a different vocabulary works."""
    from tests.test_speckv_methods import other_tokenizer_model

    draft = other_tokenizer_model()
    assert draft.tokenizer.get_vocab() != tiny_qwen.tokenizer.get_vocab()
    engine = SpecKV(target=tiny_qwen, draft=draft, budget=40, window_size=8, lookahead_tokens=6)
    result = engine.generate(LONG_PROMPT, max_new_tokens=5)
    assert result.kv_entries_kept == 40
    assert result.completion_tokens >= 1


def test_stream_joins_to_generate(tiny_pair):
    draft, target = tiny_pair
    engine = SpecKV(target=target, draft=draft, budget=40, window_size=8)
    result = engine.generate(LONG_PROMPT, max_new_tokens=30)
    stream = engine.stream(LONG_PROMPT, max_new_tokens=30)
    pieces = list(stream)
    assert "".join(pieces) == result.text
    assert len(pieces) > 1


def test_stop_string_cuts_text_and_stream(tiny_pair):
    draft, target = tiny_pair
    engine = SpecKV(target=target, draft=draft, method="snapkv", budget=40, window_size=8)
    full = engine.generate(LONG_PROMPT, max_new_tokens=30)
    visible = full.text.replace("\ufffd", "")
    assert len(visible) >= 6, "the tiny model should write some text"
    stop = visible[len(visible) // 2 : len(visible) // 2 + 2]
    cut = full.text.find(stop)
    result = engine.generate(LONG_PROMPT, max_new_tokens=30, stop=[stop, "never generated"])
    assert result.text == full.text[:cut]
    assert result.finish_reason == "stop"
    assert result.completion_tokens <= full.completion_tokens
    streamed = "".join(engine.stream(LONG_PROMPT, max_new_tokens=30, stop=stop))
    assert streamed == result.text


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tiny_pair):
    draft, target = tiny_pair
    engine = SpecKV(target=target, draft=draft, method="snapkv", budget=40, window_size=8)
    a = engine.generate(LONG_PROMPT, max_new_tokens=12, temperature=1.5, seed=7)
    b = engine.generate(LONG_PROMPT, max_new_tokens=12, temperature=1.5, seed=7)
    greedy = engine.generate(LONG_PROMPT, max_new_tokens=12)
    nucleus = engine.generate(LONG_PROMPT, max_new_tokens=12, temperature=1.5, top_p=1e-6, seed=3)
    assert a.token_ids == b.token_ids
    assert nucleus.token_ids == greedy.token_ids
    assert a.token_ids != greedy.token_ids


def test_stream_result_is_the_generators_return_value(tiny_qwen):
    engine = SpecKV(target=tiny_qwen, method="full")
    stream = engine.stream("What is the magic number?", max_new_tokens=5)
    pieces = []
    with pytest.raises(StopIteration) as done:
        while True:
            pieces.append(next(stream))
    assert done.value.value.text == "".join(pieces)


def test_messages_prompt_equals_string_prompt(tiny_qwen):
    engine = SpecKV(target=tiny_qwen, method="full")
    text = engine.generate("What is the magic number?", max_new_tokens=6)
    messages = engine.generate([{"role": "user", "content": "What is the magic number?"}], max_new_tokens=6)
    assert text.token_ids == messages.token_ids


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"budget": 0}, "budget"),
        ({"budget": -5}, "budget"),
        ({"budget": 32, "window_size": 32}, "window_size"),
        ({"budget": 16, "window_size": 40}, "window_size"),
        ({"method": "h2o"}, "unknown method"),
        ({"reduction": "median"}, "reduction|heads"),
        ({"method": "streamingllm", "budget": 4, "sink_tokens": 4}, "sink_tokens"),
        ({"lookahead_tokens": 0}, "lookahead_tokens"),
    ],
)
def test_bad_configuration(kwargs, error, tiny_pair):
    with pytest.raises(ValueError, match=error):
        SpecKV(target=tiny_pair[1], draft=tiny_pair[0], **kwargs)


@pytest.mark.parametrize(
    ("prompt", "kwargs", "exception", "error"),
    [
        ("", {}, ValueError, "empty"),
        ("   ", {}, ValueError, "empty"),
        ("hi", {"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ("hi", {"temperature": -1.0}, ValueError, "temperature"),
        ("hi", {"top_p": 0.0}, ValueError, "top_p"),
        (42, {}, TypeError, "prompt"),
    ],
)
def test_bad_generation_input(prompt, kwargs, exception, error, tiny_qwen):
    engine = SpecKV(target=tiny_qwen, method="snapkv", budget=40, window_size=8)
    with pytest.raises(exception, match=error):
        engine.generate(prompt, **kwargs)


def test_engine_leaves_the_model_unchanged(tiny_pair):
    draft, target = tiny_pair
    model = target.model
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    config_before = model.config.to_dict()
    SpecKV(target=target, draft=draft, budget=40, window_size=8).generate(LONG_PROMPT, max_new_tokens=3)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before
    assert model.config.to_dict() == config_before


def test_method_instance_is_used_as_is(tiny_pair):
    draft, target = tiny_pair
    eviction = SpecKVEviction(budget=48, window_size=4, kernel_size=3)
    engine = SpecKV(target=target, draft=draft, method=eviction)
    assert engine.method == "speckv"
    assert engine.generate(LONG_PROMPT, max_new_tokens=2).kv_entries_kept == 48


def test_tiny_models_have_distinct_outputs(tiny_pair):
    """Guard for the tests above: the tiny target does not answer with end-of-turn right away."""
    result = SpecKV(target=tiny_pair[1], method="full").generate(LONG_PROMPT, max_new_tokens=10)
    assert result.completion_tokens == 10


def test_settings_record_the_method_knobs_and_the_engine_ones(tiny_pair):
    import json

    draft, target = tiny_pair
    settings = SpecKV(target=target, draft=draft, method="speckv", budget=64).settings()
    assert settings["method"] == "speckv" and settings["window_size"] == 32 and settings["lookahead_tokens"] is None
    assert settings["chunk_size"] is None and settings["prompt_budget"] is None and "budget" not in settings
    assert settings["reduction"] == {"heads": "max", "observers": "max", "weighted_query": False, "ramp_rows": None}
    assert json.loads(json.dumps(settings)) == settings  # plain data
    assert SpecKV(target=target, draft=draft, method="speckv", budget=128).settings() == settings
    other = SpecKV(target=target, draft=draft, method="speckv", lookahead_tokens=16).settings()
    assert other == {**settings, "lookahead_tokens": 16}
    assert SpecKV(target=target, method="streamingllm").settings()["sink_tokens"] == 4
