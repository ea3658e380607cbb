"""DraftCache: per-document draft K/V reused across queries, checked against the uncached path (tiny fp32 models)."""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from draft_rag import DraftCache, LoadedModel, SpecPC, cli
from draft_rag.draft_cache import CacheStats, bytes_per_token
from draft_rag.draft_cache.fingerprint import entry_key
from draft_rag.hf import rotate_keys
from draft_rag.models import load_model
from draft_rag.scoring import prefill
from draft_rag.specpc.prompt import _DraftPrompt
from tests.tiny import tiny_model

QUERY = "What is the special magic number for the word apple?"
OTHER_QUERY = "Which fox jumps over the lazy dog?"
DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 6,
    "A special magic number is hidden in the text: 4815162. " * 3,
    "Retrieval augmented generation reads long documents, and a small draft model decides. " * 4,
]
LONG_DOC = " ".join(DOCS)


@pytest.fixture(scope="module")
def smollm3_draft():
    """A SmolLM3 draft whose first and last layers skip RoPE: the first shows every moved key, the last is scored."""
    return tiny_model("smollm3", seed=7, no_rope_layers=[0, 1, 1, 0])


def make(draft, cache=None, **kwargs):
    # Without a cache the joint reading, the uncached path a cache is compared with, and the window observers with and
    # without one, unless a test names them (SpecPC reads apart by default, and "auto" switches with the reading).
    defaults = dict(budget=48, window_size=8, kernel_size=5, neighbor_tokens=6, starting_layer_index=1,
                    observe_from="window", **({} if cache is not None else {"reading": "joint"}))
    defaults.update(kwargs)
    return SpecPC(draft=draft, cache=cache, **defaults)


def scores(pc, query, documents):
    draft = pc.load()
    return pc._score_context(draft, _DraftPrompt(draft.tokenizer, query, documents), pc._reading_cache())[0]


def question_start(draft, query, documents):
    prefix_ids, chunks = _DraftPrompt(draft.tokenizer, query, documents).cache_chunks()
    return len(prefix_ids) + sum(len(chunk.input_ids) for chunk in chunks)


def kept_overlap(a, b):
    """Jaccard overlap of the kept characters of two results over the same documents."""
    chars = [{(i, c) for i, doc in enumerate(r.documents) for s, e in doc.spans for c in range(s, e)} for r in (a, b)]
    return len(chars[0] & chars[1]) / max(len(chars[0] | chars[1]), 1)


@pytest.mark.parametrize("arch", ["qwen2", "smollm3"])
@pytest.mark.parametrize("window_size", [8, 64])
@pytest.mark.parametrize("lookahead", [1, 3])
@pytest.mark.parametrize("observe_from", ["window", "question"])
def test_single_document_scores_equal_the_uncached_path(request, arch, window_size, lookahead, observe_from):
    draft = request.getfixturevalue("draft" if arch == "qwen2" else "smollm3_draft")
    n = len(_DraftPrompt(draft.tokenizer, QUERY, [LONG_DOC]).input_ids)
    # 8 observers lie inside the question; 64 reach back into the document, so its tail runs fresh.
    assert (n - window_size < question_start(draft, QUERY, [LONG_DOC])) == (window_size == 64)
    cache = DraftCache()
    same = dict(window_size=window_size, lookahead_tokens=lookahead, observe_from=observe_from)
    cached, plain = make(draft, cache, **same), make(draft, **same)
    for query in (QUERY, OTHER_QUERY):  # the second query finds the document cached
        got, expected = scores(cached, query, [LONG_DOC]), scores(plain, query, [LONG_DOC])
        print(f"{observe_from}, window {window_size}, lookahead {lookahead}: "
              f"max score difference {(got - expected).abs().max():.2e}")
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert cached.compress(query, [LONG_DOC]).texts == plain.compress(query, [LONG_DOC]).texts
    assert cache.stats.misses == 2  # the prefix and the document, encoded once
    assert cache.stats.hits == 6


@pytest.mark.parametrize(
    ("arch", "settings"),
    [
        ("qwen2", {}),
        ("qwen2", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 1024}}),
        ("smollm3", {"no_rope_layers": [0, 1, 1, 1]}),  # the first layer without RoPE: its keys must not move
        ("smollm3", {}),
    ],
    ids=["default", "yarn", "smollm3-first-layer-without-rope", "smollm3"],
)
def test_rotated_keys_equal_keys_encoded_at_the_new_position(arch, settings):
    # First-layer keys depend only on the token and its position, so a moved chunk must match exactly.
    loaded = tiny_model(arch, seed=3, **settings)
    model, tokenizer = loaded.model, loaded.tokenizer
    before = tokenizer(DOCS[0], add_special_tokens=False)["input_ids"]
    chunk = tokenizer(DOCS[1], add_special_tokens=False)["input_ids"]
    alone, _ = prefill(model, torch.tensor([chunk]))
    behind, _ = prefill(model, torch.tensor([before + chunk]))
    at_zero = torch.stack([layer.keys[0] for layer in alone.layers])
    at_shift = torch.stack([layer.keys[0, :, len(before) :] for layer in behind.layers])
    moved, back = rotate_keys(model, at_zero, len(before)), rotate_keys(model, at_shift, -len(before))
    torch.testing.assert_close(moved[0], at_shift[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(back[0], at_zero[0], atol=1e-4, rtol=0)
    for layer, rotates in enumerate(getattr(model.config, "no_rope_layers", [])):
        if not rotates:  # a layer without RoPE keeps its keys as they are, wherever they move
            assert torch.equal(moved[layer], at_zero[layer]) and torch.equal(back[layer], at_shift[layer])


@pytest.mark.parametrize("arch", ["qwen2", "smollm3"])
def test_context_lays_chunks_out_at_their_prompt_positions(request, arch):
    draft = request.getfixturevalue("draft" if arch == "qwen2" else "smollm3_draft")
    prompt = _DraftPrompt(draft.tokenizer, QUERY, DOCS)
    prefix_ids, chunks = prompt.cache_chunks()
    documents_end = question_start(draft, QUERY, DOCS)
    assert prefix_ids + [t for c in chunks for t in c.input_ids] == prompt.input_ids[:documents_end]
    past = DraftCache().context(draft, prefix_ids, chunks, len(prompt.input_ids))
    full, _ = prefill(draft.model, torch.tensor([prompt.input_ids]))
    cached = past.get_seq_length()
    assert cached == documents_end
    torch.testing.assert_close(past.layers[0].keys, full.layers[0].keys[:, :, :cached], atol=1e-4, rtol=0)
    first = len(prefix_ids) + len(chunks[0].input_ids)  # the first document sees what it sees in a full prefill
    for layer, reference in zip(past.layers, full.layers):
        torch.testing.assert_close(layer.keys[:, :, :first], reference.keys[:, :, :first], atol=1e-4, rtol=0)
        torch.testing.assert_close(layer.values[:, :, :first], reference.values[:, :, :first], atol=1e-4, rtol=0)


@pytest.mark.parametrize("budget", [20, 48, 90])
def test_several_documents_keep_within_the_budget(draft, budget):
    cache = DraftCache()
    for query in (QUERY, OTHER_QUERY):
        result = make(draft, cache, budget=budget).compress(query, DOCS)
        reference = make(draft, budget=budget).compress(query, DOCS)
        assert len(result.documents) == len(DOCS)
        assert result.total_kept_tokens <= budget
        overlap = kept_overlap(result, reference)
        print(f"budget {budget}, {query!r}: kept-text overlap with the uncached path {overlap:.0%}")
    assert cache.stats.misses == 1 + len(DOCS)


def test_duplicated_documents_share_one_entry(draft):
    cache = DraftCache()
    docs = [DOCS[0], DOCS[1], DOCS[0]]
    result = make(draft, cache).compress(QUERY, docs)
    assert len(result.documents) == 3 and result.total_kept_tokens <= 48
    assert (cache.stats.entries, cache.stats.misses, cache.stats.hits) == (3, 3, 1)


def test_whitespace_documents_stay_out_of_the_cache(draft):
    cache = DraftCache()
    result = make(draft, cache).compress(QUERY, [DOCS[0], "   ", DOCS[1], ""])
    assert result.documents[1].blank and result.documents[3].text == ""
    assert cache.stats.entries == 3


def test_a_changed_character_makes_a_new_entry(draft):
    cache = DraftCache()
    pc = make(draft, cache)
    pc.warm(DOCS)
    assert (cache.stats.entries, cache.stats.misses) == (4, 4)
    pc.warm(DOCS)
    assert (cache.stats.entries, cache.stats.misses, cache.stats.hits) == (4, 4, 4)
    pc.warm([DOCS[0].replace("quick", "quack", 1)])
    assert (cache.stats.entries, cache.stats.misses) == (5, 5)


def test_warm_leaves_only_the_window_for_the_query(draft, monkeypatch):
    cache = DraftCache()
    pc = make(draft, cache)
    pc.warm(DOCS)
    fed = []
    decoder = draft.model.get_decoder()  # what every forward call runs, with or without the LM head
    forward = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda input_ids, **kw: fed.append(input_ids.shape[1]) or forward(
        input_ids=input_ids, **kw))
    pc.compress(QUERY, DOCS)
    n = len(_DraftPrompt(draft.tokenizer, QUERY, DOCS).input_ids)
    assert sum(fed) == max(8, n - question_start(draft, QUERY, DOCS)) < n
    assert cache.stats.misses == 4


def test_warm_needs_a_cache(draft):
    with pytest.raises(ValueError, match="needs a draft cache"):
        make(draft).warm(DOCS)


def test_entries_of_another_model_or_dtype_are_never_used(draft, tmp_path):
    cache = DraftCache(directory=tmp_path)
    make(draft, cache).warm(DOCS)
    other = tiny_model("qwen2", seed=8)
    half = LoadedModel(copy.deepcopy(draft.model).to(torch.bfloat16), draft.tokenizer)
    for model in (other, half):
        before = cache.stats
        make(model, cache).warm(DOCS)
        assert cache.stats.hits == before.hits and cache.stats.misses == before.misses + 4
    assert len(list(tmp_path.glob("*.safetensors"))) == 12
    prefix_ids, _ = _DraftPrompt(draft.tokenizer, "", DOCS).cache_chunks()
    mine, others, halfs = (entry_key(model.model, prefix_ids, None).digest for model in (draft, other, half))
    assert len({mine, others, halfs}) == 3
    # A file of one model put under another's name is refused by its metadata and rebuilt.
    (tmp_path / f"{others}.safetensors").write_bytes((tmp_path / f"{mine}.safetensors").read_bytes())
    fresh = DraftCache(directory=tmp_path)
    make(other, fresh).warm(DOCS)
    assert (fresh.stats.misses, fresh.stats.hits) == (1, 3)


def test_files_are_reused_and_corrupted_ones_rebuilt(draft, tmp_path):
    expected = make(draft, DraftCache(directory=tmp_path)).compress(QUERY, DOCS).texts
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 4 and not list(tmp_path.glob(".*"))  # no temporary files left
    reread = DraftCache(directory=tmp_path)
    assert make(draft, reread).compress(QUERY, DOCS).texts == expected
    assert (reread.stats.misses, reread.stats.hits) == (0, 4)
    files[0].write_bytes(files[0].read_bytes()[:100])
    files[1].write_bytes(b"not a safetensors file")
    rebuilt = DraftCache(directory=tmp_path)
    assert make(draft, rebuilt).compress(QUERY, DOCS).texts == expected
    assert (rebuilt.stats.misses, rebuilt.stats.hits) == (2, 2)
    again = DraftCache(directory=tmp_path)
    make(draft, again).compress(QUERY, DOCS)
    assert again.stats.misses == 0


def test_memory_stays_within_max_bytes_evicting_the_least_recently_used(draft):
    short = "The lazy dog sleeps."
    prefix_ids, (first, second, third) = _DraftPrompt(draft.tokenizer, "", [DOCS[0], DOCS[1], short]).cache_chunks()
    size = bytes_per_token(draft)
    assert len(third.input_ids) < len(second.input_ids)
    limit = size * (len(prefix_ids) + len(first.input_ids) + len(second.input_ids))
    cache = DraftCache(max_bytes=limit)
    pc = make(draft, cache)
    for docs in ([DOCS[0]], [DOCS[1]], [DOCS[0]], [short]):  # touching DOCS[0] leaves DOCS[1] least recent
        pc.warm(docs)
        assert cache.stats.bytes <= limit
    assert (cache.stats.entries, cache.stats.misses) == (3, 4)
    pc.warm([DOCS[0]])
    assert cache.stats.misses == 4
    pc.warm([DOCS[1]])  # evicted, so encoded again
    assert cache.stats.misses == 5 and cache.stats.bytes <= limit


def test_stats_count_bytes_per_token(draft):
    cache = DraftCache()
    make(draft, cache).warm(DOCS)
    assert cache.stats.bytes == cache.stats.tokens * bytes_per_token(draft)
    cache.clear()
    assert cache.stats == CacheStats(hits=0, misses=0, entries=0, tokens=0, bytes=0)


def test_bytes_per_token_of_a_24_layer_bf16_draft():
    model = tiny_model("qwen2", num_hidden_layers=24, hidden_size=128, num_attention_heads=2, num_key_value_heads=2)
    assert bytes_per_token(model.model.to(torch.bfloat16)) == 12 * 1024


def test_threads_sharing_one_cache_get_identical_results(draft):
    queries = [QUERY, OTHER_QUERY, "Where is the magic number hidden?", "What does retrieval read?"]
    serial = make(draft, DraftCache())
    expected = {query: serial.compress(query, DOCS).texts for query in queries}
    shared = DraftCache()
    pc = make(draft, shared)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda query: pc.compress(query, DOCS).texts, queries * 2))
    assert results == [expected[query] for query in queries * 2]
    assert shared.stats.entries == 4


def test_budget_at_least_context_skips_the_draft(draft, monkeypatch):
    def no_forward(*args, **kwargs):
        raise AssertionError("the draft must not run")

    monkeypatch.setattr(draft.model.get_decoder(), "forward", no_forward)  # every pass runs the decoder
    cache = DraftCache()
    result = make(draft, cache, budget=10_000).compress(QUERY, DOCS)
    assert result.texts == DOCS
    assert cache.stats == CacheStats(hits=0, misses=0, entries=0, tokens=0, bytes=0)


def test_rope_that_cannot_be_shifted_is_refused():
    draft = tiny_model("qwen2", seed=5, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    calls = []
    handle = draft.model.get_decoder().register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        for pc in (make(draft, DraftCache()), SpecPC(draft=draft, budget=48)):  # over a cache, and SpecPC's default
            with pytest.raises(NotImplementedError, match=r"cannot shift.*SpecPC\(reading='joint'\)"):
                pc.compress(QUERY, DOCS)
        assert not calls  # refused before any compute
    finally:
        handle.remove()
    assert make(draft).compress(QUERY, DOCS).total_kept_tokens <= 48  # the joint reading serves this draft


@pytest.mark.parametrize("observe_from", ["window", "question"])
def test_reading_apart_without_a_cache_scores_exactly_as_over_one(draft, observe_from):
    """SpecPC's default reading: each call keeps its own cache, so its scores are those of a DraftCache's, cold or
    warm, bit for bit, and differ from the joint reading's (so the check can fail)."""
    apart = make(draft, reading="apart", observe_from=observe_from)
    cache = DraftCache()
    cached = make(draft, cache, observe_from=observe_from)
    joint = make(draft, observe_from=observe_from)
    for query in (QUERY, OTHER_QUERY):  # the second query finds the documents cached
        expected = scores(cached, query, DOCS)
        got = apart.score(query, DOCS)
        assert torch.equal(got.scores, expected)
        assert not torch.allclose(got.scores, scores(joint, query, DOCS))
        assert apart.compress(query, DOCS).texts == cached.compress(query, DOCS).texts
        assert isinstance(got.cache, DraftCache) and got.cache is not cache and got.cache.directory is None
    assert apart.cache is None  # the call's cache is not kept by the SpecPC: nothing outlives the call but its result
    assert apart.score(QUERY, DOCS).cache is not apart.score(QUERY, DOCS).cache
    assert cache.stats.misses == 4  # the prefix and the three documents, encoded once


def test_the_joint_reading_and_a_cache_are_refused_together(draft):
    with pytest.raises(ValueError, match="reading='joint'.*leave out cache="):
        SpecPC(draft=draft, reading="joint", cache=DraftCache())
    with pytest.raises(ValueError, match="reading must be one of"):
        SpecPC(draft=draft, reading="together")
    assert SpecPC(draft=draft).settings()["reading"] == "apart"


def test_max_bytes_is_checked():
    with pytest.raises(ValueError, match="max_bytes"):
        DraftCache(max_bytes=-1)


def test_index_then_compress_with_the_cache_directory(draft_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(LONG_DOC)
    cache_dir = tmp_path / "cache"
    assert cli.main(["index", "--cache-dir", str(cache_dir), "--draft", str(draft_dir), str(doc)]) == 0
    assert "2 entries encoded" in capsys.readouterr().out
    assert len(list(cache_dir.glob("*.safetensors"))) == 2
    args = ["compress", "--query", QUERY, "--budget", "30", "--draft", str(draft_dir), "--json", str(doc)]
    assert cli.main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    del plain["seconds"]
    assert cli.main([*args, "--cache-dir", str(cache_dir)]) == 0
    cached = json.loads(capsys.readouterr().out)
    assert cached.pop("seconds") > 0
    assert cached == plain  # one document: the cache changes nothing
    assert len(list(cache_dir.glob("*.safetensors"))) == 2
    assert cli.main([*args, "--reading", "joint"]) == 0  # one document: the joint reading keeps the same text
    joint = json.loads(capsys.readouterr().out)
    assert [d["text"] for d in joint["documents"]] == [d["text"] for d in plain["documents"]]
    assert cli.main([*args, "--reading", "joint", "--cache-dir", str(cache_dir)]) == 2
    assert "reading='joint'" in capsys.readouterr().err


def test_compress_reads_several_documents_apart_unless_told_to_read_them_jointly(draft_dir, tmp_path, capsys):
    files = []
    for index, text in enumerate(DOCS):
        files.append(tmp_path / f"doc{index}.txt")
        files[-1].write_text(text)
    args = ["compress", "--query", QUERY, "--budget", "20", "--draft", str(draft_dir), "--json", *map(str, files)]
    texts = {}
    for reading in ("apart", "joint"):
        assert cli.main([*args, "--reading", reading]) == 0
        texts[reading] = [d["text"] for d in json.loads(capsys.readouterr().out)["documents"]]
    assert cli.main(args) == 0
    assert [d["text"] for d in json.loads(capsys.readouterr().out)["documents"]] == texts["apart"]
    draft = load_model(str(draft_dir))
    for reading, kept in texts.items():
        pc = SpecPC(draft=draft, budget=20, lookahead_tokens=1, reading=reading)
        assert pc.compress(QUERY, DOCS).texts == kept
    assert texts["apart"] != texts["joint"]
