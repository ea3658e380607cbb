"""Each KV eviction method on its own: scores vs the eager reference, what is kept, decoding positions."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from draft_rag.decoding import forward_token
from draft_rag.kv import NoEviction, SnapKVEviction, SpecKVEviction, StreamingLLMEviction
from draft_rag.scoring import ScoreReduction, pool_scores, prefill
from tests.test_scoring import naive_scores
from tests.tiny import CORPUS, tiny_model


@functools.cache
def other_tokenizer_model():
    """A tiny Qwen2 model whose BPE tokenizer has a different vocabulary than tests.tiny's."""
    from draft_rag.bench.tiny import tiny_model as build
    from draft_rag.bench.tiny import train_tokenizer

    tokenizer = train_tokenizer(
        [CORPUS[::-1]] * 5 + [CORPUS], 320, special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    )
    return build(tokenizer, seed=11, name="tiny-other-tokenizer", max_position_embeddings=4096)


def random_ids(vocab_size: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (1, length), generator=generator)


@dataclasses.dataclass
class RecordingSpecKV(SpecKVEviction):
    """SpecKV that records the scores each layer's selection was given."""

    seen: list = dataclasses.field(default_factory=list)

    def select(self, scores, older):
        self.seen.append(scores)
        return super().select(scores, older)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("chunk_size", [None, 2048, 13])
@pytest.mark.parametrize("lookahead", [0, 9])
def test_eviction_scores_match_eager_reference(arch, chunk_size, lookahead):
    eager = tiny_model(arch, seed=4, attn="eager")
    sdpa = tiny_model(arch, seed=4)
    vocab = sdpa.model.config.vocab_size
    prompt, extra = random_ids(vocab, 70, seed=1), random_ids(vocab, lookahead, seed=2)
    method = RecordingSpecKV(budget=24, window_size=6)
    method.compress(sdpa.model, prompt, extra if lookahead else None, chunk_size=chunk_size)
    scores = torch.stack(method.seen)
    first = 70 - 1 - 6
    everything = torch.cat([prompt, extra], dim=1)
    expected = naive_scores(eager.model, everything, first, everything.shape[1] - first, ScoreReduction())
    assert scores.shape == (2, 1, 2, first)
    torch.testing.assert_close(scores, expected[..., :first], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_scored_eviction_keeps_window_and_top_pooled_entries(pool, tiny_qwen):
    model = tiny_qwen.model
    prompt = random_ids(model.config.vocab_size, 90, seed=3)
    lookahead = random_ids(model.config.vocab_size, 7, seed=4)
    budget, window = 30, 8
    method = RecordingSpecKV(budget=budget, window_size=window, kernel_size=5, pool=pool)
    full, _ = prefill(model, prompt[:, :-1])
    cache = method.compress(model, prompt, lookahead)
    pooled = pool_scores(torch.stack(method.seen), 5, pool)
    for index, layer in enumerate(cache.layers):
        assert layer.keys.shape == layer.values.shape == (1, 2, budget - 1, 16)
        for head in range(2):
            top = set(pooled[index, 0, head].topk(budget - 1 - window).indices.tolist())
            kept = sorted(top | set(range(89 - window, 89)))
            expected = full.layers[index].keys[0, head, kept]
            torch.testing.assert_close(layer.keys[0, head], expected)
            torch.testing.assert_close(layer.values[0, head], full.layers[index].values[0, head, kept])


def test_lookahead_changes_what_is_kept(tiny_qwen):
    """SpecKV differs from SnapKV exactly by the draft observers."""
    model = tiny_qwen.model
    prompt = random_ids(model.config.vocab_size, 90, seed=5)
    lookahead = random_ids(model.config.vocab_size, 12, seed=6)
    knobs = {"budget": 20, "window_size": 4, "kernel_size": 1}
    snap = SnapKVEviction(**knobs).compress(model, prompt)
    spec = SpecKVEviction(**knobs).compress(model, prompt, lookahead)
    same = SpecKVEviction(**knobs).compress(model, prompt)
    keys = [torch.cat([layer.keys for layer in cache.layers]) for cache in (snap, spec, same)]
    assert not torch.equal(keys[0], keys[1])
    assert torch.equal(keys[0], keys[2])


def masked_reference_logits(model, ids, prompt_length, keep):
    """Full forward where tokens from the last prompt token on see only the kept older prompt positions."""
    length = ids.shape[1]
    mask = torch.ones(length, length).tril().bool()
    evicted = torch.ones(prompt_length - 1, dtype=torch.bool)
    evicted[keep] = False
    mask[prompt_length - 1 :, : prompt_length - 1] &= ~evicted
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask[None, None]).logits[0]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_streamingllm_decoding_uses_original_positions(arch):
    """Decoding on the evicted cache equals attention over the same entries at their true RoPE positions."""
    loaded = tiny_model(arch, seed=8)
    model = loaded.model
    n, budget, sinks = 60, 20, 4
    ids = random_ids(model.config.vocab_size, n + 6, seed=9)
    method = StreamingLLMEviction(budget=budget, sink_tokens=sinks)
    cache = method.compress(model, ids[:, :n])
    assert all(layer.keys.shape[2] == budget - 1 for layer in cache.layers)
    got = [forward_token(model, cache, int(ids[0, pos]), pos)[0] for pos in range(n - 1, n + 6)]
    keep = list(range(sinks)) + list(range(n - 1 - (budget - 1 - sinks), n - 1))
    expected = masked_reference_logits(model, ids, n, keep)[n - 1 :]
    torch.testing.assert_close(torch.stack(got), expected, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == budget + 6


def test_no_eviction_keeps_everything(tiny_qwen):
    ids = random_ids(tiny_qwen.model.config.vocab_size, 50)
    method = NoEviction()
    assert method.budget is None and not method.evicts(10**6)
    assert method.compress(tiny_qwen.model, ids).get_seq_length() == 49


@pytest.mark.parametrize("cls", [SnapKVEviction, SpecKVEviction, StreamingLLMEviction])
def test_short_prompts_are_not_compressed(cls, tiny_qwen):
    ids = random_ids(tiny_qwen.model.config.vocab_size, 20)
    method = cls(budget=20, **({"window_size": 4} if cls is not StreamingLLMEviction else {}))
    assert not method.evicts(20) and method.evicts(21)
    assert method.compress(tiny_qwen.model, ids).get_seq_length() == 19
    assert method.compress(tiny_qwen.model, ids[:, :1]).get_seq_length() == 0
