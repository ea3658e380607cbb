"""SpecKV with draft-guided sparse prefill: off unless asked, dense below the threshold, observers passed on."""

from __future__ import annotations

import pytest

import draft_rag.sparse_prefill as sparse
from draft_rag.engine import SpecKV
from tests.test_speckv import LONG_PROMPT


@pytest.fixture
def calls(monkeypatch):
    seen: list[dict] = []
    original = sparse.sparse_prefill_attention

    def spy(query, key, value, window_size, vertical_size, num_observers, scaling, **kwargs):
        seen.append({"n": key.shape[2], "window": window_size, "vertical": vertical_size, "observers": num_observers})
        return original(query, key, value, window_size, vertical_size, num_observers, scaling, **kwargs)

    monkeypatch.setattr(sparse, "sparse_prefill_attention", spy)
    return seen


def test_prompts_within_the_band_and_columns_are_dense(tiny_pair, calls):
    draft, target = tiny_pair
    dense = SpecKV(target=target, draft=draft, budget=40, window_size=8, lookahead_tokens=4)
    wide = SpecKV(target=target, draft=draft, budget=40, window_size=8, lookahead_tokens=4,
                  prefill_window_size=512, prefill_vertical_size=512)
    expected = dense.generate(LONG_PROMPT, max_new_tokens=8).token_ids
    assert wide.generate(LONG_PROMPT, max_new_tokens=8).token_ids == expected
    assert calls == []


def test_long_prompts_prefill_sparse_with_the_window_and_draft_answer_observing(tiny_pair, calls):
    draft, target = tiny_pair
    engine = SpecKV(target=target, draft=draft, budget=40, window_size=8, lookahead_tokens=4,
                    prefill_window_size=32, prefill_vertical_size=16)
    result = engine.generate(LONG_PROMPT, max_new_tokens=6)
    layers = target.model.config.num_hidden_layers
    assert len(calls) == layers  # one sparse attention per layer, in the one prefill pass only
    lookahead = calls[0]["n"] - result.prompt_tokens
    assert 0 < lookahead <= 8  # the draft answer (re-tokenized) rode along
    assert all(c["observers"] == 8 + 1 + lookahead and c["window"] == 32 and c["vertical"] == 16 for c in calls)
    assert result.kv_entries_kept == 40 and len(result.token_ids) >= 1
    assert target.model.config._attn_implementation == "sdpa"  # restored


def test_chunked_prefill_stays_dense(tiny_pair, calls):
    draft, target = tiny_pair
    SpecKV(target=target, draft=draft, method="snapkv", budget=40, window_size=8, chunk_size=64,
           prefill_window_size=32, prefill_vertical_size=16).generate(LONG_PROMPT, max_new_tokens=2)
    assert calls == []


@pytest.mark.parametrize(("window", "vertical"), [(32, None), (None, 16), (0, 16), (32, -1)])
def test_sparse_settings_are_checked(tiny_pair, window, vertical):
    draft, target = tiny_pair
    with pytest.raises(ValueError, match="prefill_"):
        SpecKV(target=target, draft=draft, prefill_window_size=window, prefill_vertical_size=vertical)
