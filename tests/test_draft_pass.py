"""The draft's one greedy loop (SpecPC's lookahead, SpecKV's draft answer, the cascade's answer)."""

from __future__ import annotations

import pytest
import torch

from draft_rag.models import stop_token_ids
from draft_rag.scoring import prefill
from draft_rag.specpc.draft_pass import greedy_tokens

PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12]])


@pytest.fixture(params=["tiny_qwen", "tiny_llama"])
def loaded(request):
    return request.getfixturevalue(request.param)


def generated(loaded, max_new_tokens):
    """What transformers' own greedy search continues PROMPT with, its end-of-sequence token cut."""
    out = loaded.model.generate(
        PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=stop_token_ids(loaded),
    )
    tokens = out[0, PROMPT.shape[1] :].tolist()
    return tokens[:-1] if tokens and tokens[-1] in stop_token_ids(loaded) else tokens


@pytest.mark.parametrize("max_tokens", [1, 2, 24])
def test_greedy_tokens_are_what_generate_gives_without_sampling(loaded, max_tokens):
    cache, logits = prefill(loaded.model, PROMPT)
    tokens = greedy_tokens(loaded.model, cache, logits, max_tokens, set(stop_token_ids(loaded)))
    assert tokens == generated(loaded, max_tokens)
    assert len(tokens) == max_tokens  # the random tiny models never end their turn this early
    # Every token but the last ran through the model; nothing reads the last one's output.
    assert cache.get_seq_length() == PROMPT.shape[1] + max_tokens - 1


def test_feed_last_runs_every_token_so_its_query_is_seen(tiny_qwen):
    cache, logits = prefill(tiny_qwen.model, PROMPT)
    tokens = greedy_tokens(tiny_qwen.model, cache, logits, 6, set(), feed_last=True)
    assert tokens == generated(tiny_qwen, 6)
    assert cache.get_seq_length() == PROMPT.shape[1] + 6


def test_greedy_tokens_stop_before_the_first_stop_token_without_running_it(tiny_qwen):
    expected = generated(tiny_qwen, 24)
    stop = expected[5]
    first = expected.index(stop)
    cache, logits = prefill(tiny_qwen.model, PROMPT)
    tokens = greedy_tokens(tiny_qwen.model, cache, logits, 24, {stop}, feed_last=True)
    assert tokens == expected[:first]
    assert cache.get_seq_length() == PROMPT.shape[1] + first


def test_no_tokens_asked_for_runs_nothing(tiny_qwen):
    cache, logits = prefill(tiny_qwen.model, PROMPT)
    assert greedy_tokens(tiny_qwen.model, cache, logits, 0, set(), feed_last=True) == []
    assert cache.get_seq_length() == PROMPT.shape[1]
