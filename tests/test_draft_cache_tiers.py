"""DraftCache tiers: entries on the draft's device, then in host memory, then on disk (tiny fp32 models, CPU).

A CPU draft's device tier is host memory, so it has no host tier. To run the path a draft on an accelerator
takes, the ``accelerator`` fixture makes the cache treat the CPU as one: evicted entries are copied to the
host tier, and lookups copy them back. tests/test_cuda.py checks the same on a real CUDA device (entries on
the GPU, pinned host copies, no waits).
"""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from draft_rag import DraftCache
from draft_rag import draft_cache as draft_cache_module
from draft_rag.draft_cache import CacheStats, bytes_per_token
from draft_rag.draft_cache.fingerprint import entry_key
from draft_rag.draft_cache.tiers import to_device, to_host
from draft_rag.hf import kv_shape, rotate_keys
from draft_rag.specpc.prompt import _DraftPrompt
from tests.syncs import host_reads
from tests.test_draft_cache import DOCS, LONG_DOC, OTHER_QUERY, QUERY, make, scores
from tests.tiny import no_forward, tiny_model


@pytest.fixture
def accelerator(monkeypatch):
    """Treat the CPU as an accelerator: the device tier pushes entries down to a host tier and reads them back."""
    monkeypatch.setattr(draft_cache_module, "offloads", lambda device: True)


def layout(draft, documents=DOCS):
    """The shared prefix's token ids, the documents' chunks, and the bytes of each one's entry."""
    prefix_ids, chunks = _DraftPrompt(draft.tokenizer, "", documents).cache_chunks()
    size = bytes_per_token(draft)
    return prefix_ids, chunks, size * len(prefix_ids), [size * len(chunk.input_ids) for chunk in chunks]


def small_cache(draft, **kwargs):
    """A cache whose device tier holds the prefix and one document, and whose host tier one document."""
    _, _, prefix_bytes, sizes = layout(draft)
    return DraftCache(max_bytes=prefix_bytes + max(sizes), max_host_bytes=max(sizes), **kwargs)


def placement(cache, draft, documents=DOCS):
    """Where each entry is: ``"device"``, ``"host"`` or None (not in memory), the prefix first."""
    prefix_ids, chunks, _, _ = layout(draft, documents)
    digests = [entry_key(draft.model, prefix_ids, text).digest for text in [None, *(c.text for c in chunks)]]
    tiers = {"device": cache._device.entries, "host": cache._host.entries}
    return [next((name for name, entries in tiers.items() if digest in entries), None) for digest in digests]


def check_bounds(cache):
    """The tiers within their bounds, their counts right, and no entry in both."""
    stats = cache.stats
    device, host = cache._device.entries, cache._host.entries
    assert stats.device_bytes == sum(entry.nbytes for entry in device.values()) <= cache.max_bytes
    assert stats.host_bytes == sum(entry.nbytes for entry in host.values()) <= cache.max_host_bytes
    assert (stats.device_entries, stats.host_entries) == (len(device), len(host)) and not device.keys() & host.keys()
    assert (stats.entries, stats.bytes) == (len(device) + len(host), stats.device_bytes + stats.host_bytes)
    assert stats.hits == stats.device_hits + stats.host_hits + stats.disk_hits


def test_entries_fall_from_device_to_host_to_disk_and_lookups_move_them_back_up(draft, accelerator, tmp_path):
    cache = small_cache(draft, directory=tmp_path)
    pc = make(draft, cache)
    steps = [
        # warm these documents: then the prefix, DOCS[0], DOCS[1] and DOCS[2] are here
        ([DOCS[0]], ["device", "device", None, None]),
        ([DOCS[1]], ["device", "host", "device", None]),  # the prefix was looked up last: DOCS[0] goes down
        ([DOCS[2]], ["device", None, "host", "device"]),  # the host tier holds one document: DOCS[0] is on disk only
        ([DOCS[1]], ["device", None, "device", "host"]),  # a host hit moves DOCS[1] back up
        ([DOCS[0]], ["device", "device", "host", None]),  # a disk hit too
    ]
    for documents, expected in steps:
        pc.warm(documents)
        assert placement(cache, draft) == expected, documents
        check_bounds(cache)
    stats = cache.stats
    assert (stats.misses, stats.device_hits, stats.host_hits, stats.disk_hits, stats.hits) == (4, 4, 1, 1, 6)
    assert stats.tokens * bytes_per_token(draft) == stats.bytes


def test_a_cpu_draft_has_no_host_tier(draft):
    cache = small_cache(draft)
    pc = make(draft, cache)
    pc.warm([DOCS[0]])
    pc.warm([DOCS[1]])
    assert placement(cache, draft) == ["device", None, "device", None]
    assert (cache.stats.host_entries, cache.stats.host_bytes) == (0, 0)
    pc.warm([DOCS[0]])  # dropped, so encoded again
    assert (cache.stats.misses, cache.stats.host_hits) == (4, 0)
    check_bounds(cache)


def test_a_document_scores_the_same_from_every_tier(draft, accelerator, tmp_path):
    uncached = scores(make(draft), QUERY, [LONG_DOC])
    cache = DraftCache(directory=tmp_path)
    fresh = scores(make(draft, cache), QUERY, [LONG_DOC])
    torch.testing.assert_close(fresh, uncached, atol=1e-4, rtol=0)  # one document: as if uncached
    assert cache.stats.misses == 2

    def served(cache, tier, hits):
        before = getattr(cache.stats, tier)
        result = scores(make(draft, cache), QUERY, [LONG_DOC])
        assert getattr(cache.stats, tier) == before + hits, tier
        return result

    assert torch.equal(served(cache, "device_hits", 2), fresh)
    from_disk = DraftCache(max_bytes=cache.stats.bytes, directory=tmp_path)
    assert torch.equal(served(from_disk, "disk_hits", 2), fresh)
    make(draft, from_disk).warm([DOCS[1]])  # pushes the document down to the host tier
    assert placement(from_disk, draft, [LONG_DOC]) == ["device", "host"]
    assert torch.equal(served(from_disk, "host_hits", 1), fresh)
    assert placement(from_disk, draft, [LONG_DOC]) == ["device", "device"]


def test_documents_spread_over_the_tiers_score_like_fresh_ones(draft, accelerator, tmp_path):
    expected = {query: scores(make(draft, DraftCache()), query, DOCS) for query in (QUERY, OTHER_QUERY)}
    DraftCache(directory=tmp_path).add(draft, *layout(draft)[:2])  # every entry on disk
    cache = small_cache(draft, directory=tmp_path)
    pc = make(draft, cache)
    pc.warm([DOCS[1]])
    pc.warm([DOCS[0]])
    assert placement(cache, draft) == ["device", "device", "host", None]
    for query in (QUERY, OTHER_QUERY):
        assert torch.equal(scores(pc, query, DOCS), expected[query])
        check_bounds(cache)
    stats = cache.stats
    assert stats.misses == 0 and min(stats.device_hits, stats.host_hits, stats.disk_hits) > 0


def test_an_entry_larger_than_the_device_tier_stays_in_the_host_tier(draft, accelerator):
    expected = scores(make(draft, DraftCache()), QUERY, DOCS)
    cache = DraftCache(max_bytes=0)
    pc = make(draft, cache)
    for _ in range(2):
        assert torch.equal(scores(pc, QUERY, DOCS), expected)
        assert placement(cache, draft) == ["host"] * 4
        check_bounds(cache)
    assert (cache.stats.misses, cache.stats.host_hits) == (4, 4)
    nowhere = DraftCache(max_bytes=0, max_host_bytes=0)
    make(draft, nowhere).warm(DOCS)
    assert nowhere.stats == CacheStats(hits=0, misses=4, entries=0, tokens=0, bytes=0)


def test_threads_moving_entries_between_tiers_get_identical_results(draft, accelerator):
    jobs = [(QUERY, DOCS), (OTHER_QUERY, DOCS[::-1]), ("Where is the magic number hidden?", DOCS[:2]),
            ("What does retrieval read?", [DOCS[2], DOCS[0]])] * 3
    serial = make(draft, DraftCache())
    expected = [scores(serial, query, documents) for query, documents in jobs]
    cache = small_cache(draft)  # too small for the documents: nearly every lookup moves entries
    pc = make(draft, cache)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda job: scores(pc, *job), jobs))
    assert all(torch.equal(got, want) for got, want in zip(results, expected))
    check_bounds(cache)
    stats = cache.stats
    assert stats.hits + stats.misses == sum(1 + len(documents) for _, documents in jobs)
    assert stats.host_hits > 0


def test_a_warm_lookup_reads_nothing_back_from_the_device(draft, accelerator):
    prefix_ids, chunks, prefix_bytes, sizes = layout(draft)
    cache = DraftCache(max_bytes=prefix_bytes + max(sizes))  # the host tier keeps all the device tier pushes out
    cache.add(draft, prefix_ids, chunks)
    length = len(prefix_ids) + sum(len(chunk.input_ids) for chunk in chunks)
    before = cache.stats
    with host_reads() as reads:
        past = cache.context(draft, prefix_ids, chunks, length)
    assert reads == []
    assert past.get_seq_length() == length and cache.stats.misses == before.misses
    assert cache.stats.host_hits > before.host_hits  # entries moved between tiers meanwhile


# The copies between tiers.


@pytest.mark.parametrize("cuda", [False, True])
def test_host_copies_are_pinned_and_queued_only_where_cuda_is_available(monkeypatch, cuda):
    source = torch.randn(2, 3, 4)
    calls = []
    empty, copy = torch.empty, torch.Tensor.copy_

    def recording_empty(*args, pin_memory=False, **kwargs):
        calls.append(("pin_memory", pin_memory))
        return empty(*args, **kwargs)  # pinning needs a real CUDA device

    def recording_copy(self, other, non_blocking=False):
        calls.append(("non_blocking", non_blocking))
        return copy(self, other)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch, "empty", recording_empty)
    monkeypatch.setattr(torch.Tensor, "copy_", recording_copy)
    host = to_host(source)
    monkeypatch.undo()
    assert calls == [("pin_memory", cuda), ("non_blocking", cuda)]
    assert host.device.type == "cpu" and torch.equal(host, source) and host.data_ptr() != source.data_ptr()


def test_copies_to_an_accelerator_are_queued_and_copies_to_the_cpu_wait(monkeypatch):
    seen = []
    to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        seen.append(kwargs.get("non_blocking"))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    tensor = torch.randn(3)
    assert to_device(tensor, torch.device("meta")).device.type == "meta"  # stands for an accelerator here
    assert to_device(tensor, torch.device("cpu")) is tensor
    assert seen == [True, False]


# Rotation in the model's dtype.


def test_keys_turn_in_their_own_dtype_without_an_fp32_copy(monkeypatch):
    model = tiny_model("qwen2", seed=3).model
    layers, kv_heads, head_dim = kv_shape(model)
    keys = torch.randn(layers, kv_heads, 40, head_dim, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    reference = rotate_keys(model, keys.float(), 37)
    widened = []
    to_float = torch.Tensor.float

    def recording_float(self, *args, **kwargs):
        widened.append(tuple(self.shape))
        return to_float(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "float", recording_float)
    turned = rotate_keys(model, keys, 37)
    monkeypatch.undo()
    assert turned.dtype == torch.bfloat16 and tuple(keys.shape) not in widened
    # Within a few bf16 roundings (2**-8 each) of the fp32 rotation of the same keys.
    assert (turned.float() - reference).abs().max() <= 4 * 2**-8 * keys.float().abs().max()
    per_key = torch.tensor([37] * 25 + [-5] * 15)
    both = rotate_keys(model, keys, per_key)
    assert torch.equal(both[:, :, :25], turned[:, :, :25])
    assert torch.equal(both[:, :, 25:], rotate_keys(model, keys, -5)[:, :, 25:])


# device_map.


@pytest.mark.parametrize(
    "device_map",
    [{"model.embed_tokens": "cpu", "model.layers": 0, "model.norm": 0, "lm_head": 0}, {"model": 0, "lm_head": "disk"}],
    ids=["cpu-and-gpu", "offloaded-to-disk"],
)
def test_a_draft_split_over_devices_is_refused_before_any_compute(draft, monkeypatch, device_map):
    monkeypatch.setattr(draft.model, "hf_device_map", device_map, raising=False)
    cache = DraftCache()
    named = r"split over the devices '(cpu|disk)', 0 by device_map.*load the draft on one device \(e\.g\. device_map="
    for run in (lambda: make(draft, cache).compress(QUERY, DOCS), lambda: make(draft, cache).warm(DOCS)):
        with no_forward(draft), pytest.raises(NotImplementedError, match=named):
            run()
    assert cache.stats == CacheStats(hits=0, misses=0, entries=0, tokens=0, bytes=0)


@pytest.mark.parametrize(
    "device_map",
    [{"": "cpu"}, {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "lm_head": "cpu"}],
)
def test_a_draft_on_one_device_through_device_map_is_cached(draft, monkeypatch, device_map):
    expected = make(draft, DraftCache()).compress(QUERY, DOCS).texts
    monkeypatch.setattr(draft.model, "hf_device_map", device_map, raising=False)
    cache = DraftCache()
    assert make(draft, cache).compress(QUERY, DOCS).texts == expected
    assert cache.stats.misses == 4


# Settings.


@pytest.mark.parametrize(("value", "error"), [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("1", TypeError)])
def test_max_host_bytes_is_checked(value, error):
    with pytest.raises(error, match="DraftCache max_host_bytes"):
        DraftCache(max_host_bytes=value)


def test_a_pickled_cache_keeps_its_tier_sizes(tmp_path):
    copy = pickle.loads(pickle.dumps(DraftCache(123, tmp_path, max_host_bytes=456)))
    assert (copy.max_bytes, copy.directory, copy.max_host_bytes) == (123, tmp_path, 456)
    assert DraftCache().max_host_bytes == 4 << 30
