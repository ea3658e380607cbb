"""Batches: generate(list of prompts) equals one call per prompt, token for token, for every method."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from draft_rag.decoding import forward_token, forward_tokens
from draft_rag.engine import SpecKV
from draft_rag.engine.batch import stack_caches
from draft_rag.hf import cache_bytes
from draft_rag.kv import METHODS, KVPeak
from draft_rag.scoring import prefill
from tests.test_concurrency import run_in_threads
from tests.test_speckv import LONG_PROMPT, PROSE
from tests.test_speckv_methods import random_ids
from tests.tiny import no_forward, tiny_model

QUESTION = "What is the magic number?"
PROMPTS = [
    LONG_PROMPT,
    QUESTION,  # under the budget: keeps every entry
    PROSE * 2 + "Which model decides which tokens matter?",
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": PROSE * 4 + QUESTION}],
]
KEPT = ("text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "kv_entries_kept",
        "kv_entries_full", "kv_bytes_kept", "kv_bytes_full")


def same_results(batch, singles):
    assert len(batch) == len(singles)
    for got, expected in zip(batch, singles, strict=True):
        assert {k: getattr(got, k) for k in KEPT} == {k: getattr(expected, k) for k in KEPT}


@pytest.fixture(scope="module")
def tiny_llama_target():
    return tiny_model("llama", seed=9, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                      num_hidden_layers=3)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("arch", "max_new_tokens"), [("qwen2", 7), ("llama", 20)])
def test_greedy_batch_equals_one_call_per_prompt(method, arch, max_new_tokens, tiny_pair, tiny_llama_target):
    draft, target = tiny_pair[0], tiny_pair[1] if arch == "qwen2" else tiny_llama_target
    engine = SpecKV(target=target, draft=draft, method=method, budget=40, window_size=8, lookahead_tokens=6)
    singles = [engine.generate(prompt, max_new_tokens=max_new_tokens) for prompt in PROMPTS]
    assert len({r.prompt_tokens for r in singles}) == len(PROMPTS)
    if method != "full":
        assert min(r.prompt_tokens for r in singles) < 40 < max(r.prompt_tokens for r in singles)
    same_results(engine.generate(PROMPTS, max_new_tokens=max_new_tokens), singles)


def test_sequences_stop_at_different_steps(tiny_pair):
    """Stop strings end some sequences early; the others go on, and each result equals its own call."""
    draft, target = tiny_pair
    engine = SpecKV(target=target, draft=draft, method="snapkv", budget=40, window_size=8)
    full = [engine.generate(prompt, max_new_tokens=30).text.replace("\ufffd", "") for prompt in PROMPTS[:3]]
    stops = [full[0][len(full[0]) // 3 :][:2], full[2][len(full[2]) // 2 :][:2]]
    singles = [engine.generate(prompt, max_new_tokens=30, stop=stops) for prompt in PROMPTS[:3]]
    assert {r.finish_reason for r in singles} == {"stop", "length"}
    assert len({r.completion_tokens for r in singles}) > 1
    same_results(engine.generate(PROMPTS[:3], max_new_tokens=30, stop=stops), singles)


def test_seeded_sampling_in_a_batch_equals_one_call_per_prompt(tiny_pair):
    draft, target = tiny_pair
    engine = SpecKV(target=target, draft=draft, method="streamingllm", budget=40)
    knobs = {"max_new_tokens": 12, "temperature": 1.2, "top_p": 0.9, "seed": 5}
    same_results(engine.generate(PROMPTS, **knobs), [engine.generate(p, **knobs) for p in PROMPTS])


def test_batch_results_carry_kv_and_timings(tiny_pair):
    draft, target = tiny_pair
    engine = SpecKV(target=target, draft=draft, budget=40, window_size=8)
    short, long = engine.generate([QUESTION, LONG_PROMPT], max_new_tokens=5)
    single = engine.generate(LONG_PROMPT, max_new_tokens=5)
    for result in (short, long):
        assert set(result.timings) == {"compress_s", "draft_s", "prefill_s", "ttft_s", "decode_s", "tokens_per_s"}
        assert result.timings["ttft_s"] >= result.timings["prefill_s"] > 0
    assert short.timings["draft_s"] < long.timings["draft_s"]  # within budget: no draft
    assert short.timings["ttft_s"] > long.timings["prefill_s"]  # the first token waits for every prefill
    # The long prompt's prefill peaks while the short prompt's cache waits for it.
    entry_bytes = short.kv_bytes_full // short.prompt_tokens
    assert short.peak_kv_bytes == long.peak_kv_bytes == single.peak_kv_bytes + (short.prompt_tokens - 1) * entry_bytes


def test_one_prompt_in_a_list_returns_a_list(tiny_qwen):
    engine = SpecKV(target=tiny_qwen, method="full")
    [result] = engine.generate([QUESTION], max_new_tokens=4)
    assert result.token_ids == engine.generate(QUESTION, max_new_tokens=4).token_ids
    messages = [{"role": "user", "content": QUESTION}]
    assert engine.generate((messages,), max_new_tokens=4)[0].token_ids == result.token_ids


def test_empty_batch_returns_nothing(tiny_pair):
    engine = SpecKV(target=tiny_pair[1], draft=tiny_pair[0], budget=40, window_size=8)
    with no_forward(*tiny_pair):
        assert engine.generate([], max_new_tokens=4) == []


@pytest.mark.parametrize(
    ("prompts", "exception", "error"),
    [
        ([QUESTION, ""], ValueError, r"prompts\[1\] is empty"),
        ([QUESTION, 42], TypeError, r"prompts\[1\] must be a string"),
        ([None, QUESTION], TypeError, r"prompts\[0\] must be a string"),
        ([QUESTION, [{"role": "robot", "content": "hi"}]], ValueError, r"prompts\[1\]\[0\]\['role'\]"),
        ([QUESTION, ["nested", "batch"]], TypeError, r"prompts\[1\]\[0\] must be a \{'role', 'content'\} dict"),
        ([QUESTION, "bad \ud800"], ValueError, r"prompts\[1\] holds a lone surrogate"),
        ([QUESTION, QUESTION * 800], ValueError, r"prompts\[1\] has \d+ tokens in the target model"),
    ],
)
def test_bad_batch_items_are_named_before_any_compute(prompts, exception, error, tiny_pair):
    engine = SpecKV(target=tiny_pair[1], draft=tiny_pair[0], budget=40, window_size=8)
    with no_forward(*tiny_pair), pytest.raises(exception, match=error):
        engine.generate(prompts, max_new_tokens=4)


def test_a_batch_cannot_be_streamed(tiny_qwen):
    engine = SpecKV(target=tiny_qwen, method="full")
    with no_forward(tiny_qwen), pytest.raises(TypeError, match=r"stream\(\) answers one prompt.*generate\(\)"):
        engine.stream([QUESTION, QUESTION])


def drain(run):
    """The pieces of each prompt of a ``run_prepared`` run, and its results."""
    pieces: dict[int, list[str]] = {}
    while True:
        try:
            index, piece = next(run)
        except StopIteration as done:
            return pieces, done.value
        pieces.setdefault(index, []).append(piece)


def test_prepared_prompts_decode_together_each_with_its_own_settings(tiny_pair):
    """A server's batch: prompts prepared one by one with their own decoding settings, answered together."""
    draft, target = tiny_pair
    engine = SpecKV(target=target, draft=draft, budget=40, window_size=8, lookahead_tokens=6)
    knobs = [{"max_new_tokens": 5}, {"max_new_tokens": 12, "temperature": 1.2, "top_p": 0.9, "seed": 3},
             {"max_new_tokens": 20, "stop": "the"}, {"max_new_tokens": 9, "seed": 1}]
    singles = [engine.generate(prompt, **settings) for prompt, settings in zip(PROMPTS, knobs)]
    assert len({r.completion_tokens for r in singles}) > 2
    prepared = [engine.prepare(prompt, **settings, name=f"request {i}")
                for i, (prompt, settings) in enumerate(zip(PROMPTS, knobs))]
    assert [p.prompt_tokens for p in prepared] == [r.prompt_tokens for r in singles]
    pieces, results = drain(engine.run_prepared(prepared))
    same_results(results, singles)
    assert ["".join(pieces.get(i, [])) for i in range(len(PROMPTS))] == [r.text for r in singles]


def test_a_cancelled_prompt_leaves_its_batch_at_the_next_step(tiny_pair):
    draft, target = tiny_pair
    engine = SpecKV(target=target, draft=draft, budget=40, window_size=8)
    single = engine.generate(PROMPTS[2], max_new_tokens=30)
    prepared = [engine.prepare(prompt, max_new_tokens=30) for prompt in (LONG_PROMPT, PROMPTS[2])]
    run = engine.run_prepared(prepared)
    index, _ = next(run)
    prepared[index].cancelled = True
    _, results = drain(run)
    cancelled, other = results[index], results[1 - index]
    assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens < 30
    assert other.token_ids == single.token_ids and other.text == single.text


def test_prepare_checks_before_any_compute(tiny_pair):
    engine = SpecKV(target=tiny_pair[1], draft=tiny_pair[0], budget=40, window_size=8)
    with no_forward(*tiny_pair):
        with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
            engine.prepare(QUESTION, max_new_tokens=0)
        with pytest.raises(ValueError, match=r"messages\[0\]\['role'\]"):
            engine.prepare([{"role": "robot", "content": "hi"}], name="messages")
        with pytest.raises(ValueError, match="at least one prompt"):
            engine.run_prepared([])


def test_batches_and_streams_in_threads_match_sequential_results(tiny_pair):
    draft, target = tiny_pair
    engine = SpecKV(target=target, draft=draft, budget=40, window_size=8)
    jobs = [
        lambda: [r.token_ids for r in engine.generate(PROMPTS, max_new_tokens=10)],
        lambda: [r.token_ids for r in engine.generate(PROMPTS[::-1], max_new_tokens=10)],
        lambda: "".join(engine.stream(LONG_PROMPT, max_new_tokens=10)),
    ]
    expected = [job() for job in jobs]
    assert run_in_threads(jobs * 2) == expected * 2


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_left_padded_caches_decode_like_their_own(arch):
    """Stacked caches of 0, 9 and 5 entries decode each sequence as its own cache does, at its own positions."""
    loaded = tiny_model(arch, seed=3)
    model = loaded.model
    ids = [random_ids(model.config.vocab_size, length, seed=length) for length in (1, 10, 6)]
    own = [prefill(model, row[:, :-1])[0] if row.shape[1] > 1 else DynamicCache() for row in ids]
    expected = [forward_token(model, cache, int(row[0, -1]), row.shape[1] - 1)[0] for cache, row in zip(own, ids)]
    caches = [prefill(model, row[:, :-1])[0] if row.shape[1] > 1 else DynamicCache() for row in ids]
    unstacked = sum(cache_bytes(cache) for cache in caches)
    peak = KVPeak()
    cache, padding = stack_caches(caches, peak)
    assert padding.tolist() == [[False] * 9, [True] * 9, [False] * 4 + [True] * 5]
    assert cache_bytes(cache) == 3 * 9 * unstacked // 14
    assert unstacked < peak.bytes < cache_bytes(cache) + unstacked
    logits = forward_tokens(model, cache, [int(row[0, -1]) for row in ids], [row.shape[1] - 1 for row in ids],
                            padding)
    torch.testing.assert_close(logits, torch.stack(expected), atol=1e-5, rtol=1e-5)
