"""The bench's shared KV pass: one prefill per sample, the same answers and caches as each method run alone."""

from __future__ import annotations

import pytest
import torch

from draft_rag import SpecKV
from draft_rag.bench.kv_pass import PrefilledCache, SharedKVPass
from draft_rag.bench.methods import build_methods
from draft_rag.bench.tasks import TaskGenerator
from draft_rag.decoding import as_messages, chat_prompt_ids

KV = ["speckv", "snapkv", "streamingllm"]


@pytest.fixture(scope="module")
def samples(tiny_pair):
    generator = TaskGenerator(tiny_pair[1].tokenizer, chunk_tokens=64)
    return [generator.sample("niah_multikey", 600, 0), generator.sample("qa", 600, 1)]


def _forward_lengths(model):
    """Record the length of every forward call's input (a pre-hook); returns the list and the handle."""
    lengths: list[int] = []

    def hook(module, args, kwargs):
        lengths.append(kwargs["input_ids"].shape[1])

    return lengths, model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)


def test_every_method_and_budget_answers_as_it_does_alone_from_one_prefill(tiny_pair, samples):
    draft, target = tiny_pair
    shared = SharedKVPass(target, draft, methods=list(KV), budgets=[48, 96])
    for sample in samples:
        n = chat_prompt_ids(target.tokenizer, as_messages(sample.prompt())).shape[1]
        lengths, handle = _forward_lengths(target.model)
        draft_lengths, draft_handle = _forward_lengths(draft.model)
        try:
            answers = {(name, budget): shared.answer(sample, name, budget) for name in KV for budget in (48, 96)}
        finally:
            handle.remove()
            draft_handle.remove()
        assert lengths.count(n) == 1  # one prompt pass for six rows
        assert sum(1 for length in draft_lengths if length > 1) == 1  # one draft answer
        for (name, budget), (text, compress_s, answer_s, prompt_tokens, kv_bytes) in answers.items():
            alone = SpecKV(target=target, draft=draft, method=name, budget=budget).generate(
                sample.prompt(), max_new_tokens=sample.max_new_tokens
            )
            assert text == alone.text, (name, budget)
            assert (prompt_tokens, kv_bytes) == (alone.prompt_tokens, alone.kv_bytes_kept)
            assert (compress_s > 0) == (name == "speckv") and answer_s > 0
        # Both SpecKV budgets are charged the one draft answer they share.
        assert answers["speckv", 48][1] == answers["speckv", 96][1]


@pytest.mark.parametrize("name", KV)
def test_kept_entries_equal_the_engines_own_eviction(tiny_pair, samples, name):
    draft, target = tiny_pair
    sample = samples[0]
    shared = SharedKVPass(target, draft, methods=[name], budgets=[64])
    kept = []
    original = shared._decoder

    def keep(cache):
        kept.append([(layer.keys.clone(), layer.values.clone()) for layer in cache.layers])
        return original(cache)

    shared._decoder = keep
    shared.answer(sample, name, 64)
    engine = SpecKV(target=target, draft=draft, method=name, budget=64)
    prompt_ids = chat_prompt_ids(target.tokenizer, as_messages(sample.prompt()))
    lookahead = None
    if engine.eviction.uses_draft:
        request = engine._tokenize(as_messages(sample.prompt()), "prompt", _settings(sample.max_new_tokens))
        lookahead = engine._draft_lookahead(request)
    cache = engine.eviction.compress(target.model, prompt_ids, lookahead)
    assert len(kept[0]) == len(cache.layers)
    for (keys, values), layer in zip(kept[0], cache.layers, strict=True):
        assert keys.shape == layer.keys.shape
        torch.testing.assert_close(keys, layer.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(values, layer.values, rtol=1e-4, atol=1e-5)


def _settings(max_new_tokens):
    from draft_rag.engine.requests import _Settings

    return _Settings.check(max_new_tokens, 0.0, 1.0, None, None)


def test_a_budget_over_the_prompt_keeps_everything_and_skips_the_draft(tiny_pair, samples):
    draft, target = tiny_pair
    sample = samples[1]
    shared = SharedKVPass(target, draft, methods=["speckv"], budgets=[4096])
    draft_lengths, handle = _forward_lengths(draft.model)
    try:
        text, compress_s, _, _, _ = shared.answer(sample, "speckv", 4096)
    finally:
        handle.remove()
    full = SpecKV(target=target, method="full").generate(sample.prompt(), max_new_tokens=sample.max_new_tokens)
    assert text == full.text and compress_s == 0.0 and not draft_lengths


def test_a_budget_not_given_up_front_joins_and_the_pass_is_made_again(tiny_pair, samples):
    draft, target = tiny_pair
    sample = samples[0]
    shared = SharedKVPass(target, draft, methods=["snapkv"], budgets=[48])
    shared.answer(sample, "snapkv", 48)
    first = shared._latest
    text = shared.answer(sample, "snapkv", 80)[0]
    assert shared.budgets == [48, 80] and shared._latest is not first
    engine = SpecKV(target=target, method="snapkv", budget=80)
    alone = engine.generate(sample.prompt(), max_new_tokens=sample.max_new_tokens)
    assert text == alone.text


def test_a_prefilled_cache_is_handed_over_once(tiny_pair):
    from transformers import DynamicCache

    eviction = PrefilledCache(budget=None, cache=DynamicCache())
    model = tiny_pair[1].model
    eviction.compress(model, torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="used once"):
        eviction.compress(model, torch.ones(1, 3, dtype=torch.long))


def test_bench_kv_methods_share_one_pass_and_record_it(tiny_pair, samples):
    draft, target = tiny_pair
    methods, _ = build_methods(KV, draft=draft, target=target, kv_budgets=[48, 96])
    passes = {id(methods[name].shared) for name in KV}
    assert len(passes) == 1
    assert all(methods[name].settings["prefill"].startswith("one target prefill") for name in KV)
    outcome = methods["snapkv"].run(samples[0], 48)
    assert outcome.prompt_tokens > 48 and outcome.context_tokens > 0
