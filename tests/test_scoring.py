"""The efficient observer scoring must equal a naive full-attention reference."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import DynamicCache

from draft_rag import scoring
from draft_rag.hf import cache_kwargs, cache_tensors, hooked_cache
from draft_rag.scoring import (
    OBSERVER_BLOCK_SIZE,
    ObserverScores,
    ScoreReduction,
    extend_cache,
    observer_weights,
    pool_scores,
    prefill,
    reduce_rows,
)
from tests.tiny import tiny_model


def naive_scores(model, input_ids, first, count, reduction):
    """Full n x n eager attention, softmaxed by the model itself, sliced to the observer rows and reduced."""
    with torch.no_grad():
        out = model(input_ids=input_ids, output_attentions=True)
    kv_heads = model.config.num_key_value_heads
    weights = observer_weights(count) if reduction.weighted_query else None
    per_layer = []
    for attn in out.attentions:
        rows = reduce_rows(attn[:, :, first : first + count].float(), kv_heads, reduction, weights)
        per_layer.append(rows.amax(dim=2) if reduction.observers == "max" else rows.mean(dim=2))
    return torch.stack(per_layer)


def efficient_scores(model, input_ids, first, count, reduction, chunk_size, block_size=OBSERVER_BLOCK_SIZE):
    with ObserverScores(model, first, count, reduction, block_size=block_size) as scorer:
        prefill(model, input_ids, DynamicCache(config=model.config), chunk_size=chunk_size)
    return scorer.scores()


@pytest.mark.parametrize("arch", ["qwen2", "llama", "smollm3"])  # SmolLM3: its last layer has no RoPE
@pytest.mark.parametrize("chunk_size", [1000, 16, 7])
@pytest.mark.parametrize(
    "reduction",
    [
        ScoreReduction(),
        ScoreReduction(heads="mean", observers="mean"),
        ScoreReduction(weighted_query=True),
        ScoreReduction(heads="mean", observers="max", weighted_query=True),
    ],
)
def test_efficient_scores_match_eager_reference(arch, chunk_size, reduction):
    eager = tiny_model(arch, seed=5, attn="eager")
    sdpa = tiny_model(arch, seed=5, attn="sdpa")
    torch.manual_seed(0)
    ids = torch.randint(3, eager.model.config.vocab_size, (2, 53))
    first, count = 40, 13  # observers straddle chunk borders for chunk sizes 16 and 7
    expected = naive_scores(eager.model, ids, first, count, reduction)
    got = efficient_scores(sdpa.model, ids, first, count, reduction, chunk_size)
    assert got.shape == expected.shape == (sdpa.model.config.num_hidden_layers, 2, 2, 53)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [1, 5, 32, 1000])
@pytest.mark.parametrize(
    "reduction", [ScoreReduction(), ScoreReduction(heads="mean", observers="mean", weighted_query=True)]
)
def test_observer_blocks_match_eager_reference(block_size, reduction):
    """Processing observers a block at a time changes the memory, not the scores."""
    eager = tiny_model("qwen2", seed=5, attn="eager")
    sdpa = tiny_model("qwen2", seed=5, attn="sdpa")
    torch.manual_seed(1)
    ids = torch.randint(3, eager.model.config.vocab_size, (1, 90))
    expected = naive_scores(eager.model, ids, 10, 80, reduction)
    got = efficient_scores(sdpa.model, ids, 10, 80, reduction, chunk_size=16, block_size=block_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_attention_rows_do_not_grow_with_the_number_of_observers(tiny_qwen, monkeypatch):
    computed: list[torch.Size] = []
    real = scoring.observer_attention

    def spy(*args):
        probs = real(*args)
        computed.append(probs.shape)
        return probs

    monkeypatch.setattr(scoring, "observer_attention", spy)
    ids = torch.randint(3, tiny_qwen.model.config.vocab_size, (1, 260))

    def largest(num_observers):
        computed.clear()
        with ObserverScores(tiny_qwen.model, 260 - num_observers, num_observers):
            prefill(tiny_qwen.model, ids)
        return max(shape[2] for shape in computed), max(shape.numel() for shape in computed)

    rows, numel = largest(200)
    assert rows == OBSERVER_BLOCK_SIZE
    assert (rows, numel) == largest(OBSERVER_BLOCK_SIZE)


def test_hooks_ignore_forward_calls_from_other_threads(tiny_qwen):
    """Another thread running the same model inside the block (a shared draft) does not change the scores."""
    model = tiny_qwen.model
    torch.manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (1, 40))
    other = torch.randint(3, model.config.vocab_size, (1, 60))
    with ObserverScores(model, 30, 10) as alone:
        prefill(model, ids)
    halfway, intruded = threading.Event(), threading.Event()

    def intruder():
        halfway.wait(60)
        prefill(model, other)
        intruded.set()

    threading.Thread(target=intruder, daemon=True).start()
    with ObserverScores(model, 30, 10) as shared:
        cache, _ = prefill(model, ids[:, :20])
        halfway.set()
        assert intruded.wait(60)
        prefill(model, ids[:, 20:], cache)
    assert torch.equal(shared.scores(), alone.scores())


def test_scores_accumulate_over_decode_steps(tiny_qwen):
    """Observers fed one token at a time (lookahead) score like one full forward."""
    eager = tiny_model("qwen2", seed=0, attn="eager")
    ids = torch.randint(3, eager.model.config.vocab_size, (1, 30))
    reduction = ScoreReduction(weighted_query=True)
    expected = naive_scores(eager.model, ids, 20, 10, reduction)
    with ObserverScores(tiny_qwen.model, 20, 10, reduction) as scorer:
        cache, _ = prefill(tiny_qwen.model, ids[:, :25], chunk_size=8)
        for pos in range(25, 30):
            prefill(tiny_qwen.model, ids[:, pos : pos + 1], cache)
    torch.testing.assert_close(scorer.scores(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "smollm3"])
def test_extend_cache_scores_and_caches_like_prefill_without_the_lm_head(arch):
    """The decoder alone gives the same K/V and the same scores; the language-model head never runs."""
    loaded = tiny_model(arch, seed=0)
    model = loaded.model
    ids = torch.randint(3, model.config.vocab_size, (1, 30))
    reduction = ScoreReduction(weighted_query=True)
    head_calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
    try:
        with ObserverScores(model, 20, 10, reduction) as with_logits:
            cache, _ = prefill(model, ids, chunk_size=8)
        calls_with_logits = len(head_calls)
        with ObserverScores(model, 20, 10, reduction) as without:
            extended = extend_cache(model, ids, chunk_size=8)
    finally:
        handle.remove()
    assert calls_with_logits == 4 and len(head_calls) == calls_with_logits  # one per chunk, then none
    assert torch.equal(without.scores(), with_logits.scores())
    for (k1, v1), (k2, v2) in zip(cache_tensors(cache), cache_tensors(extended), strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_hooks_are_removed_after_the_block(tiny_qwen):
    model = tiny_qwen.model
    before = sum(len(m._forward_hooks) for m in model.modules())
    with ObserverScores(model, 0, 2):
        assert sum(len(m._forward_hooks) for m in model.modules()) == before + 2
    assert sum(len(m._forward_hooks) for m in model.modules()) == before


def test_weighted_query_ramp():
    torch.testing.assert_close(observer_weights(5), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert observer_weights(1).tolist() == [1.0]


def test_weighted_query_silences_the_oldest_observer():
    probs = torch.zeros(1, 2, 3, 4)
    probs[:, :, 0, 0] = 1.0  # only the oldest observer looks at key 0
    probs[:, :, 2, 3] = 0.5
    rows = reduce_rows(probs, 1, ScoreReduction(weighted_query=True), observer_weights(3))
    assert rows[0, 0, :, 0].max().item() == 0.0
    assert rows[0, 0, 2, 3].item() == 0.5


def test_pool_keeps_length_and_spreads_peaks():
    scores = torch.zeros(1, 10)
    scores[0, 5] = 1.0
    pooled = pool_scores(scores, 3, "max")
    assert pooled.shape == scores.shape
    assert pooled[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    avg = pool_scores(scores, 4, "avg")
    assert avg.shape == scores.shape
    assert avg[0, 4:8].tolist() == [0.25] * 4 and avg.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="pool"):
        pool_scores(scores, 3, "median")  # type: ignore[arg-type]


def test_cache_keyword_follows_the_model_forward(tiny_qwen):
    import inspect

    cache = DynamicCache()
    (keyword,) = cache_kwargs(tiny_qwen.model, cache)
    assert keyword in inspect.signature(type(tiny_qwen.model).forward).parameters

    class OlderModel(torch.nn.Module):  # transformers before 5.25 took the cache only as past_key_values
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return past_key_values

    assert cache_kwargs(OlderModel(), cache) == {"past_key_values": cache}
    assert hooked_cache({"past_key_values": cache}) is cache
    assert hooked_cache({"cache": cache, "past_key_values": None}) is cache
    with pytest.raises(RuntimeError, match="KV cache"):
        hooked_cache({"hidden_states": None})
