"""Eviction inside the prefill: same result as evicting afterwards, and a peak of one full layer, not all."""

from __future__ import annotations

import pytest
import torch

from draft_rag.engine import SpecKV
from draft_rag.hf import cache_bytes, keep_layer_entries
from draft_rag.kv import KVPeak, SnapKVEviction, SpecKVEviction, StreamingLLMEviction
from draft_rag.kv.base import evicting_layers
from draft_rag.scoring import prefill
from tests.test_speckv import LONG_PROMPT
from tests.test_speckv_methods import random_ids
from tests.tiny import tiny_model

METHODS = {
    "snapkv": SnapKVEviction(budget=24, window_size=6, kernel_size=3),
    "speckv": SpecKVEviction(budget=24, window_size=6, kernel_size=3),
    "streamingllm": StreamingLLMEviction(budget=24, sink_tokens=4),
}


def entry_bytes(loaded) -> int:
    """Key and value bytes of one position in one layer (fp32)."""
    config = loaded.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_key_value_heads * head_dim * 4


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_shrinking_earlier_layers_mid_forward_changes_nothing(arch):
    """The mask and positions are made before the first layer and each layer reads only its own cache."""
    loaded = tiny_model(arch, seed=5)
    ids = random_ids(loaded.model.config.vocab_size, 40, seed=1)
    _, expected = prefill(loaded.model, ids)
    with evicting_layers(loaded.model, lambda layer, _: keep_layer_entries(layer, torch.arange(0, 39, 3)), KVPeak()):
        cache, logits = prefill(loaded.model, ids)
    assert torch.equal(logits, expected)
    assert all(layer.keys.shape[2] == 13 for layer in cache.layers)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("name", list(METHODS))
def test_in_layer_eviction_equals_evicting_after_the_prefill(arch, name):
    """One forward pass either way; only when each layer is evicted differs, so the caches are identical."""
    loaded = tiny_model(arch, seed=6)
    vocab = loaded.model.config.vocab_size
    prompt, lookahead = random_ids(vocab, 80, seed=2), random_ids(vocab, 7, seed=3)
    method = METHODS[name]
    in_layer, after = KVPeak(), KVPeak()
    inside = method.compress(loaded.model, prompt, lookahead, peak=in_layer)
    afterwards = method.compress(loaded.model, prompt, lookahead, chunk_size=10**6, peak=after)
    for a, b in zip(inside.layers, afterwards.layers, strict=True):
        assert a.keys.shape[2] == 23
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)

    layers = loaded.model.config.num_hidden_layers
    per_layer = entry_bytes(loaded)
    full_length = {"snapkv": 80, "speckv": 87, "streamingllm": 79}[name]
    # Peak inside the pass: every earlier layer compressed, the last one still full.
    assert in_layer.bytes == ((layers - 1) * 23 + full_length) * per_layer
    # Evicting afterwards, the whole prefilled cache (with the draft answer's entries) existed.
    assert after.bytes == layers * full_length * per_layer
    assert cache_bytes(inside) == layers * 23 * per_layer < in_layer.bytes < after.bytes


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("method", ["speckv", "snapkv", "streamingllm"])
def test_engine_one_pass_generates_like_evicting_after(arch, method, tiny_pair):
    target = tiny_model(arch, seed=7, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                        num_hidden_layers=3)
    knobs = {"target": target, "draft": tiny_pair[0], "method": method, "budget": 40, "window_size": 8}
    one_pass = SpecKV(**knobs).generate(LONG_PROMPT, max_new_tokens=12)
    after = SpecKV(**knobs, chunk_size=10**6).generate(LONG_PROMPT, max_new_tokens=12)
    assert one_pass.token_ids == after.token_ids
    assert one_pass.kv_bytes_kept == after.kv_bytes_kept
    layers, per_layer = 3, entry_bytes(target)
    n = one_pass.prompt_tokens
    assert one_pass.peak_kv_bytes <= (layers - 1) * 39 * per_layer + 2 * n * per_layer  # + a draft answer <= n
    assert one_pass.peak_kv_bytes < after.peak_kv_bytes
    assert one_pass.peak_kv_bytes < one_pass.kv_bytes_full
    prefilled = n if method == "snapkv" else n - 1  # scored methods also run the last prompt token
    if method != "speckv":  # the draft answer's length is not known here
        assert after.peak_kv_bytes == layers * prefilled * per_layer


def test_chunked_prefill_peak_is_the_full_prompt_cache(tiny_pair):
    draft, target = tiny_pair
    result = SpecKV(target=target, method="streamingllm", budget=40, chunk_size=16).generate(
        LONG_PROMPT, max_new_tokens=4
    )
    n = result.prompt_tokens
    assert result.peak_kv_bytes == result.kv_bytes_full // n * (n - 1)


@pytest.mark.parametrize("max_new_tokens", [1, 9])
def test_full_cache_peak_is_the_final_cache(max_new_tokens, tiny_pair):
    target = tiny_pair[1]
    result = SpecKV(target=target, method="full").generate(LONG_PROMPT, max_new_tokens=max_new_tokens)
    final_entries = result.prompt_tokens + result.completion_tokens - 1
    assert result.peak_kv_bytes == final_entries * 3 * entry_bytes(target)


def test_long_decoding_peak_is_the_grown_cache(tiny_pair):
    """Once decoding has grown the compressed cache past the prefill's peak, the final cache is the peak."""
    draft, target = tiny_pair
    result = SpecKV(target=target, method="streamingllm", budget=40).generate(
        LONG_PROMPT, max_new_tokens=120
    )
    per_layer = entry_bytes(target)
    prefill_peak = (2 * 39 + result.prompt_tokens - 1) * per_layer
    final = 3 * (40 + result.completion_tokens - 1) * per_layer
    assert result.peak_kv_bytes == final > prefill_peak
