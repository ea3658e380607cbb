"""Sparse prefill must equal dense attention under the same vertical-slash mask, and leave the model as it was.

Both kernels are checked: sdpa over query blocks, and FlexAttention over a block mask. On the CPU FlexAttention
runs uncompiled here (it computes every score, which is exact and fast at these sizes) except in one test that
compiles it, as the GPU path does; the block mask itself is checked block by block against the dense mask.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as flex
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import draft_rag.sparse_prefill as sparse_module
from draft_rag.sparse_prefill import (
    FLEX_BLOCK_SIZE,
    default_kernel,
    sparse_prefill,
    sparse_prefill_attention,
    vertical_columns,
    vertical_slash_block_mask,
)
from tests.syncs import host_reads
from tests.tiny import tiny_model

KERNELS = ["sdpa", "flex"]


@pytest.fixture(autouse=True)
def uncompiled_flex(monkeypatch):
    """FlexAttention without torch.compile: the same masks and values, no minute-long compile per shape."""
    monkeypatch.setattr(flex, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)
    monkeypatch.setattr(sparse_module, "_compiled_flex_attention", lambda: flex.flex_attention)


def naive_columns(q, k, num_observers, vertical_size, window_size, scaling):
    """Full n x n causal attention, observer rows maxed over each KV group and over observers, top-k."""
    batch, heads, n, _ = q.shape
    kv_heads = k.shape[1]
    logits = q.float() @ k.float().repeat_interleave(heads // kv_heads, dim=1).transpose(-1, -2) * scaling
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)[:, :, n - num_observers :]
    scores = probs.reshape(batch, kv_heads, heads // kv_heads, num_observers, n).amax(dim=(2, 3))
    count = min(vertical_size, n - window_size)
    return scores[..., : n - window_size].topk(count, dim=-1).indices.sort(dim=-1).values


def vertical_slash_mask(columns, n, window_size):
    """``[batch, kv_heads, n, n]``: query i sees keys i-window+1..i, and the chosen columns before that."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    band = (j <= i) & (j > i - window_size)
    chosen = torch.zeros(*columns.shape[:2], n, dtype=torch.bool)
    chosen.scatter_(-1, columns, True)
    return band | (chosen[:, :, None, :] & (j < i - window_size + 1))


def masked_dense(q, k, v, mask, scaling):
    """Plain fp32 softmax attention under a per-KV-head boolean mask."""
    group = q.shape[1] // k.shape[1]
    logits = q.float() @ k.float().repeat_interleave(group, dim=1).transpose(-1, -2) * scaling
    logits = logits.masked_fill(~mask.repeat_interleave(group, dim=1), float("-inf"))
    return (logits.softmax(-1) @ v.float().repeat_interleave(group, dim=1)).to(q.dtype)


def random_qkv(batch, heads, kv_heads, n, dim=16, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, n, dim, generator=generator) for h in (heads, kv_heads, kv_heads))
    return q.to(dtype), k.to(dtype), v.to(dtype)


CASES = [  # batch, heads, kv_heads, n, window, vertical, observers, block
    (1, 4, 2, 40, 8, 8, 5, 7),
    (1, 6, 2, 64, 16, 4, 9, 16),  # Qwen2-like GQA groups of 3
    (1, 2, 1, 33, 4, 0, 1, 5),  # band only (a pure sliding window)
    (1, 4, 4, 50, 3, 46, 20, 4),  # every candidate column but one; most verticals fall inside later bands
    (2, 4, 2, 45, 10, 12, 45, 1000),  # batch of two, every position observes, one block
    (1, 12, 2, 70, 12, 20, 13, 1),  # Qwen2.5-1.5B head layout, one query per block
]


LONG_CASES = [  # several FlexAttention blocks of queries and of vertical keys, lengths not multiples of 128
    (1, 4, 2, 300, 40, 150, 9, 64),
    (2, 6, 2, 700, 130, 200, 20, 256),
    (1, 4, 4, 500, 3, 400, 20, 100),  # most vertical keys fall inside later bands
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES + LONG_CASES)
def test_sparse_attention_matches_masked_dense_reference(case, kernel):
    batch, heads, kv_heads, n, window, vertical, observers, block = case
    q, k, v = random_qkv(batch, heads, kv_heads, n, seed=n)
    scaling = q.shape[-1] ** -0.5
    columns = vertical_columns(q, k, observers, vertical, window, scaling)
    assert torch.equal(columns, naive_columns(q, k, observers, vertical, window, scaling))
    expected = masked_dense(q, k, v, vertical_slash_mask(columns, n, window), scaling)
    out = sparse_prefill_attention(q, k, v, window, vertical, observers, scaling, block_size=block, kernel=kernel)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_sparse_attention_in_bf16_errs_no_more_than_dense_bf16(kernel):
    """The kernels compute in the model's dtype: their error against fp32 is that of dense bf16 attention."""
    q, k, v = random_qkv(1, 6, 2, 300, dtype=torch.bfloat16, seed=3)
    scaling = q.shape[-1] ** -0.5
    out = sparse_prefill_attention(q, k, v, 40, 30, 7, scaling, block_size=64, kernel=kernel)
    assert out.dtype == torch.bfloat16
    columns = vertical_columns(q, k, 7, 30, 40, scaling)
    expected = masked_dense(q.float(), k.float(), v.float(), vertical_slash_mask(columns, 300, 40), scaling)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
    causal = torch.ones(300, 300, dtype=torch.bool).tril().expand(1, 2, 300, 300)
    dense_error = (dense.float() - masked_dense(q.float(), k.float(), v.float(), causal, scaling)).abs().max()
    assert (out.float() - expected).abs().max() <= 2 * dense_error


@pytest.mark.parametrize("kernel", KERNELS)
def test_sparse_attention_reads_nothing_back_to_the_host(kernel):
    """No ``.tolist()``/``.item()`` per head or block: on a GPU each would wait for the device's queue."""
    q, k, v = random_qkv(2, 6, 2, 300, seed=4)
    with host_reads() as reads:
        sparse_prefill_attention(q, k, v, 40, 30, 7, 0.25, block_size=64, kernel=kernel)
    assert reads == []


@pytest.mark.parametrize("n, window, vertical", [(300, 40, 150), (700, 130, 200), (260, 1, 0), (513, 300, 128)])
def test_flex_block_mask_lists_exactly_the_blocks_with_seen_keys(n, window, vertical):
    """Every key block that some query of a query block sees is listed, as full only when it sees all of it."""
    q, k, _ = random_qkv(2, 6, 2, n, seed=n)
    columns = vertical_columns(q, k, 9, vertical, window, 0.25)
    mask = vertical_slash_block_mask(columns, n, window, heads=6)
    padded_size = mask.seq_lengths[1] - n
    # The dense mask over the key layout: the vertical columns (padded with the never-seen column n), then all keys.
    padded = F.pad(columns, (0, padded_size - columns.shape[-1]), value=n)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    band = ((j <= i) & (j > i - window)).expand(2, 2, n, n)
    dense = torch.cat([padded[:, :, None, :] <= i - window, band], dim=-1)
    size = FLEX_BLOCK_SIZE
    blocks_q, blocks_kv = -(-n // size), -(-(padded_size + n) // size)
    pads = (0, blocks_kv * size - padded_size - n, 0, blocks_q * size - n)
    # Positions past the ends belong to no tile's keys or queries: neither seen nor unseen.
    any_seen = F.pad(dense, pads, value=False).reshape(2, 2, blocks_q, size, blocks_kv, size).any(dim=(3, 5))
    all_seen = F.pad(dense, pads, value=True).reshape(2, 2, blocks_q, size, blocks_kv, size).all(dim=(3, 5))
    group = 3
    full = _listed(mask.full_kv_num_blocks, mask.full_kv_indices, blocks_kv)
    partial = _listed(mask.kv_num_blocks, mask.kv_indices, blocks_kv)
    assert torch.equal(full, all_seen.repeat_interleave(group, dim=1))
    assert torch.equal(partial, (any_seen & ~all_seen).repeat_interleave(group, dim=1))


def _listed(num_blocks, indices, blocks_kv):
    """A block mask's ``(num_blocks, indices)`` lists as a dense ``[batch, heads, q blocks, kv blocks]`` boolean."""
    listed = torch.arange(indices.shape[-1]) < num_blocks[..., None]
    dense = torch.zeros(*indices.shape[:3], blocks_kv, dtype=torch.long)
    return dense.scatter_add(-1, indices.long(), listed.long()).bool()


def test_compiled_flex_attention_matches_the_reference(monkeypatch):
    """The GPU path as it runs there: FlexAttention compiled (here by the CPU backend) over the block mask."""
    monkeypatch.undo()
    q, k, v = random_qkv(1, 4, 2, 400, seed=5)
    scaling = q.shape[-1] ** -0.5
    # 128 columns: one whole block of vertical keys, which the last query blocks see in full.
    columns = vertical_columns(q, k, 9, 128, 40, scaling)
    expected = masked_dense(q, k, v, vertical_slash_mask(columns, 400, 40), scaling)
    with torch.inference_mode():
        out = sparse_prefill_attention(q, k, v, 40, 128, 9, scaling, kernel="flex")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_default_kernel_is_flex_on_cuda_only():
    assert default_kernel(torch.device("cuda", 0)) == "flex"
    assert default_kernel(torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="kernel must be one of flex, sdpa"):
        sparse_prefill_attention(*random_qkv(1, 4, 2, 40), 8, 8, 5, 0.25, kernel="triton")


@pytest.mark.parametrize("n, window, vertical", [(24, 8, 16), (24, 8, 100), (10, 64, 0)])
def test_short_sequences_get_exact_dense_attention(n, window, vertical):
    q, k, v = random_qkv(1, 4, 2, n, seed=1)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(sparse_prefill_attention(q, k, v, window, vertical, 4, q.shape[-1] ** -0.5), dense)


def test_every_column_chosen_is_dense_attention():
    """With room for every candidate, the vertical-slash mask is the full causal mask."""
    q, k, v = random_qkv(1, 4, 2, 30, seed=2)
    n, window = 30, 6
    columns = vertical_columns(q, k, 3, n, window, 0.25)
    assert columns.shape[-1] == n - window
    mask = vertical_slash_mask(columns, n, window)
    assert torch.equal(mask[0, 0], torch.ones(n, n, dtype=torch.bool).tril())


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"window_size": 0}, ValueError),
        ({"vertical_size": -1}, ValueError),
        ({"num_observers": 0}, ValueError),
        ({"num_observers": 41}, ValueError),
        ({"block_size": 2.5}, TypeError),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error):
    q, k, v = random_qkv(1, 4, 2, 40)
    settings = {"window_size": 8, "vertical_size": 8, "num_observers": 5, "scaling": 0.25, **kwargs}
    block = settings.pop("block_size", 16)
    with pytest.raises(error, match=next(iter(kwargs))):
        sparse_prefill_attention(q, k, v, **settings, block_size=block)


def test_cache_extension_is_rejected_by_the_pure_function():
    q, _, _ = random_qkv(1, 4, 2, 5)
    _, k, v = random_qkv(1, 4, 2, 40)
    with pytest.raises(ValueError, match="prefill from position 0"):
        sparse_prefill_attention(q, k, v, 8, 8, 5, 0.25)


# --- whole model -------------------------------------------------------------------------------------

WINDOW, VERTICAL, OBSERVERS = 8, 8, 5
REFERENCE = "test_masked_dense_vertical_slash"


def _reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The explicit masked dense computation for from-scratch prefills, stock sdpa otherwise."""
    n = key.shape[2]
    if query.shape[2] != n or n <= WINDOW + VERTICAL:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    columns = vertical_columns(query, key, OBSERVERS, VERTICAL, WINDOW, scaling)
    out = masked_dense(query, key, value, vertical_slash_mask(columns, n, WINDOW), scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE, _reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


@pytest.fixture(scope="module")
def target():
    return tiny_model("qwen2", seed=11, hidden_size=96, num_attention_heads=6, num_key_value_heads=2)


@pytest.fixture(scope="module")
def smollm3_target():
    """Its last layer has no RoPE: sparse prefill takes the layer's queries and keys as they come."""
    return tiny_model("smollm3", seed=11)


def _ids(model, n, seed=0):
    return torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def _prefill_and_step(model, ids):
    """Full-sequence logits of a from-scratch prefill, then the logits of one decode step on its cache."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        first = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        step = model(input_ids=first[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
    return first, step


def _reference_run(model, ids):
    model.config._attn_implementation = REFERENCE
    try:
        return _prefill_and_step(model, ids)
    finally:
        model.config._attn_implementation = "sdpa"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch", ["qwen2", "smollm3"])
@pytest.mark.parametrize("n", [17, 40, 97])
def test_model_logits_match_masked_dense_model(request, arch, n, kernel):
    model = request.getfixturevalue("target" if arch == "qwen2" else "smollm3_target").model
    ids = _ids(model, n, seed=n)
    expected_prefill, expected_step = _reference_run(model, ids)
    with sparse_prefill(model, window_size=WINDOW, vertical_size=VERTICAL, num_observers=OBSERVERS, block_size=6,
                        kernel=kernel):
        got_prefill, got_step = _prefill_and_step(model, ids)
    torch.testing.assert_close(got_prefill, expected_prefill, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_step, expected_step, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa"


def test_sparse_prefill_changes_long_prefills_only(target):
    model = target.model
    long_ids = _ids(model, 60, seed=1)
    dense_long, _ = _prefill_and_step(model, long_ids)
    with sparse_prefill(model, window_size=WINDOW, vertical_size=VERTICAL, num_observers=OBSERVERS):
        sparse_long, _ = _prefill_and_step(model, long_ids)
    # The first WINDOW positions see every earlier key either way; later ones lose keys.
    torch.testing.assert_close(sparse_long[:, :WINDOW], dense_long[:, :WINDOW], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sparse_long[:, -1], dense_long[:, -1], atol=1e-3)


@pytest.mark.parametrize("n", [5, WINDOW + VERTICAL])
def test_short_prompts_get_exactly_the_dense_logits(target, n):
    model = target.model
    ids = _ids(model, n, seed=2)
    dense = _prefill_and_step(model, ids)
    with sparse_prefill(model, window_size=WINDOW, vertical_size=VERTICAL, num_observers=OBSERVERS):
        sparse = _prefill_and_step(model, ids)
    assert all(torch.equal(a, b) for a, b in zip(dense, sparse))


def test_chunked_prefill_stays_dense(target):
    """Only a from-scratch call is sparse: later chunks extend a cache and get the dense result."""
    model = target.model
    ids = _ids(model, 40, seed=3)
    with torch.inference_mode():
        dense_cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :12], past_key_values=dense_cache, use_cache=True)
        dense = model(input_ids=ids[:, 12:], past_key_values=dense_cache, use_cache=True).logits
        with sparse_prefill(model, window_size=4, vertical_size=4, num_observers=3):
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :6], past_key_values=cache, use_cache=True)  # short: dense
            model(input_ids=ids[:, 6:12], past_key_values=cache, use_cache=True)
            sparse = model(input_ids=ids[:, 12:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(sparse, dense, atol=1e-6, rtol=1e-6)


def test_attention_mask_of_ones_is_accepted_padding_is_not(target):
    model = target.model
    ids = _ids(model, 40, seed=4)
    expected, _ = _reference_run(model, ids)
    with sparse_prefill(model, window_size=WINDOW, vertical_size=VERTICAL, num_observers=OBSERVERS), torch.no_grad():
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        padded = torch.ones_like(ids)
        padded[:, :3] = 0
        with pytest.raises(NotImplementedError, match="unpadded"):
            model(input_ids=ids, attention_mask=padded)
    assert model.config._attn_implementation == "sdpa"


def test_implementation_restored_after_an_error(target):
    model = target.model
    with pytest.raises(RuntimeError, match="boom"):
        with sparse_prefill(model, num_observers=3):
            assert model.config._attn_implementation != "sdpa"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert all(layer.self_attn.config._attn_implementation == "sdpa" for layer in model.model.layers)


def test_nested_blocks_and_eager_models_are_rejected(target):
    with sparse_prefill(target.model, num_observers=3):
        with pytest.raises(ValueError, match="already inside a sparse_prefill block"):
            with sparse_prefill(target.model, num_observers=3):
                pass
    eager = tiny_model("qwen2", seed=12, attn="eager")
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        with sparse_prefill(eager.model, num_observers=3):
            pass
    assert eager.model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="num_observers"):
        with sparse_prefill(target.model, num_observers=0):
            pass
    with pytest.raises(ValueError, match="kernel must be one of"):
        with sparse_prefill(target.model, num_observers=3, kernel="dense"):
            pass


def test_other_threads_keep_dense_attention(target):
    model = target.model
    ids = _ids(model, 60, seed=5)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    seen = []
    with sparse_prefill(model, window_size=WINDOW, vertical_size=VERTICAL, num_observers=OBSERVERS):
        worker = threading.Thread(target=lambda: seen.append(model(input_ids=ids).logits.detach()))
        worker.start()
        worker.join()
    assert torch.equal(seen[0], dense)


def test_observer_scores_compose_with_sparse_prefill(target):
    """SpecKV scores keys and prefills sparsely in the same forward pass; layer 0 sees the same inputs either way."""
    from draft_rag.scoring import ObserverScores, prefill

    model = target.model
    ids = _ids(model, 50, seed=6)
    with ObserverScores(model, 45, 5) as dense_scorer:
        prefill(model, ids, chunk_size=50)
    with ObserverScores(model, 45, 5) as scorer, sparse_prefill(
        model, window_size=WINDOW, vertical_size=VERTICAL, num_observers=OBSERVERS
    ):
        prefill(model, ids, chunk_size=50)
    torch.testing.assert_close(scorer.scores()[0], dense_scorer.scores()[0], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(scorer.scores()[1], dense_scorer.scores()[1], atol=1e-4)
