"""What only a CUDA device can show: no waits in the hot loops, the GPU kernels' results, no fp32 copies, the
draft cache's entries on the GPU and in pinned host memory.

These run only where CUDA is available (``benchmarks/gpu_run.sh`` runs them on a lent GPU, in the dtype of
``DRAFT_RAG_TEST_DTYPE``, bf16 by default); on a CPU-only machine they are skipped, and the CPU tests check the
same code paths as far as a CPU can (tests/test_host_syncs.py, tests/test_sparse_prefill.py,
tests/test_draft_cache_tiers.py).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from draft_rag import DraftCache
from draft_rag.decoding import Sampler
from draft_rag.draft_cache import bytes_per_token
from draft_rag.engine import SpecKV
from draft_rag.scoring import observer_attention, prefill, score_operand
from draft_rag.sparse_prefill import sparse_prefill_attention, vertical_columns
from draft_rag.specpc.draft_pass import greedy_tokens
from draft_rag.specpc.prompt import _DraftPrompt
from tests.test_draft_cache import DOCS, QUERY, make, scores
from tests.test_sparse_prefill import masked_dense, random_qkv, vertical_slash_mask
from tests.test_speckv import LONG_PROMPT
from tests.tiny import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPE = getattr(torch, os.environ.get("DRAFT_RAG_TEST_DTYPE", "bfloat16"))


def cuda_model(**overrides):
    loaded = tiny_model("qwen2", seed=21, **overrides)
    loaded.model.to(device="cuda", dtype=DTYPE)
    return loaded


def synchronizing_calls(run) -> list[str]:
    """``file:line`` of each synchronizing CUDA operation that draft-rag's code made while ``run()`` ran."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "draft_rag" in w.filename]


def test_greedy_tokens_wait_for_no_token():
    """The draft's greedy loop: the same synchronizing calls for 4 tokens as for 24 (none per token)."""
    loaded = cuda_model()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]], device="cuda")
    counts = []
    for tokens in (4, 24):
        cache, logits = prefill(loaded.model, ids)
        counts.append(synchronizing_calls(
            lambda cache=cache, logits=logits, tokens=tokens: greedy_tokens(loaded.model, cache, logits, tokens, {1, 2})
        ))
    assert counts[0] == counts[1]


def test_decode_waits_once_per_step():
    """The engine's decode loop: each step adds at most one synchronizing call (the read of its tokens)."""
    engine = SpecKV(target=cuda_model(), method="snapkv", budget=40, window_size=8)
    measured = []
    for tokens in (4, 12):
        results = []

        def run(tokens: int = tokens, results: list = results) -> None:
            results.extend(engine.generate([LONG_PROMPT, "hello there"], max_new_tokens=tokens, temperature=1.0,
                                           seed=1))

        calls = synchronizing_calls(run)
        measured.append((len(calls), max(len(result.token_ids) for result in results)))
    (few, few_steps), (many, many_steps) = measured
    assert many - few <= many_steps - few_steps


@pytest.mark.parametrize("n, window, vertical", [(1000, 128, 128), (4100, 512, 1024)])
def test_compiled_flex_and_sdpa_kernels_match_the_reference(n, window, vertical):
    q, k, v = (t.to("cuda", DTYPE) for t in random_qkv(1, 12, 2, n, dim=64, seed=n))
    scaling = 64**-0.5
    columns = vertical_columns(q, k, 33, vertical, window, scaling)
    expected = masked_dense(q.float(), k.float(), v.float(), vertical_slash_mask(columns.cpu(), n, window).cuda(),
                            scaling)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
    causal = torch.ones(n, n, dtype=torch.bool, device="cuda").tril().expand(1, 2, n, n)
    tolerance = 2 * (dense.float() - masked_dense(q.float(), k.float(), v.float(), causal, scaling)).abs().max()
    for kernel in ("flex", "sdpa"):
        out = sparse_prefill_attention(q, k, v, window, vertical, 33, scaling, kernel=kernel)
        assert out.dtype == DTYPE and (out.float() - expected).abs().max() <= tolerance, kernel


def test_observer_scores_use_half_precision_operands_without_an_fp32_copy():
    q, k, _ = (t.to("cuda", DTYPE) for t in random_qkv(1, 8, 2, 3000, dim=128, seed=1))
    assert score_operand(k) is k
    positions = torch.arange(2968, 3000, device="cuda")
    got = observer_attention(q[:, :, -32:], k, positions, 128**-0.5)
    expected = observer_attention(q[:, :, -32:].float(), k.float(), positions, 128**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_sampling_stays_on_the_device_and_repeats_with_a_seed():
    logits = torch.randn(3, 1000, device="cuda")
    draws = [Sampler(temperature=0.9, top_p=0.95, seed=7)(logits) for _ in range(2)]
    assert draws[0].device.type == "cuda" and torch.equal(draws[0], draws[1])
    assert synchronizing_calls(lambda: Sampler(temperature=0.9, top_p=0.95, seed=7)(logits)) == []


def test_speckv_with_sparse_prefill_runs_on_cuda():
    target, draft = cuda_model(num_hidden_layers=3), cuda_model()
    dense = SpecKV(target=target, draft=draft, budget=40, window_size=8, lookahead_tokens=4)
    sparse = SpecKV(target=target, draft=draft, budget=40, window_size=8, lookahead_tokens=4,
                    prefill_window_size=32, prefill_vertical_size=16)
    wide = SpecKV(target=target, draft=draft, budget=40, window_size=8, lookahead_tokens=4,
                  prefill_window_size=4096, prefill_vertical_size=4096)
    expected = dense.generate(LONG_PROMPT, max_new_tokens=6).token_ids
    assert wide.generate(LONG_PROMPT, max_new_tokens=6).token_ids == expected
    assert len(sparse.generate(LONG_PROMPT, max_new_tokens=6).token_ids) >= 1


def test_draft_cache_keeps_entries_on_the_gpu_and_pinned_below_it_and_moves_them_without_waiting():
    draft = cuda_model()
    expected = scores(make(draft, DraftCache()), QUERY, DOCS)
    prefix_ids, chunks = _DraftPrompt(draft.tokenizer, "", DOCS).cache_chunks()
    longest = max(len(chunk.input_ids) for chunk in chunks)
    cache = DraftCache(max_bytes=bytes_per_token(draft) * (len(prefix_ids) + longest))  # the rest goes to the host
    cache.add(draft, prefix_ids, chunks)
    on_device, on_host = list(cache._device.entries.values()), list(cache._host.entries.values())
    assert on_device and all(entry.keys.is_cuda and entry.values.is_cuda for entry in on_device)
    assert on_host and all(entry.keys.is_pinned() and entry.values.is_pinned() for entry in on_host)
    length = len(prefix_ids) + sum(len(chunk.input_ids) for chunk in chunks)
    before = cache.stats
    assert synchronizing_calls(lambda: cache.context(draft, prefix_ids, chunks, length)) == []
    assert cache.stats.host_hits > before.host_hits and cache.stats.misses == before.misses == 4
    assert torch.equal(scores(make(draft, cache), QUERY, DOCS), expected)


def test_draft_cache_takes_a_draft_placed_on_one_gpu_with_device_map():
    draft = cuda_model()
    draft.model.hf_device_map = {"": torch.cuda.current_device()}
    cache = DraftCache()
    first = make(draft, cache).compress(QUERY, DOCS).texts
    assert make(draft, cache).compress(QUERY, DOCS).texts == first
    assert (cache.stats.misses, cache.stats.device_hits, cache.stats.host_entries) == (4, 4, 0)
