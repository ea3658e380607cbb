"""SpecKV with the packaged real pair: a needle survives budget 256, and no eviction means plain generate."""

from __future__ import annotations

import pytest
import torch

from draft_rag import SpecKV
from draft_rag.commands.demo import needle_haystack
from draft_rag.decoding import as_messages, chat_prompt_ids
from draft_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET, load_model, stop_token_ids

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def target():
    return load_model(DEFAULT_TARGET)


def test_needle_answered_at_budget_256(target):
    docs, question, answer = needle_haystack(target.tokenizer, 1900, 0.5, seed=50)
    prompt = "\n\n".join([*docs, question])
    engine = SpecKV(target=target, draft=DEFAULT_DRAFT, method="speckv", budget=256)
    result = engine.generate(prompt, max_new_tokens=16)
    assert 1800 <= result.prompt_tokens <= 2600
    assert result.kv_entries_kept == 256
    assert result.kv_bytes_kept * 7 < result.kv_bytes_full
    assert answer in result.text


def test_no_eviction_equals_plain_generate(target):
    prompt = "Name three prime numbers and explain in one sentence what a prime number is."
    engine = SpecKV(target=target, draft=DEFAULT_DRAFT, method="speckv", budget=256)
    result = engine.generate(prompt, max_new_tokens=12)
    ids = chat_prompt_ids(target.tokenizer, as_messages(prompt)).to(target.device)
    with torch.inference_mode():
        out = target.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=stop_token_ids(target),
        )
    assert result.prompt_tokens < 256
    assert result.token_ids == out[0, ids.shape[1] :].tolist()
