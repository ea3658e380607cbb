"""The hot loops read nothing back from the device per token, row or head; sampling stays on the device.

Reads are counted with :func:`tests.syncs.host_reads` (calls such as ``.item()`` made by draft-rag's code). The
greedy draft loop is also run in the order it takes on a CUDA device (each stop check read after the next
forward pass is queued), where a stop token runs through the model and must leave no trace.
"""

from __future__ import annotations

import pytest
import torch

import draft_rag.decoding as decoding
from draft_rag import scoring
from draft_rag.decoding import HostCopies, Sampler, sample_rows
from draft_rag.engine import SpecKV
from draft_rag.kv import SnapKVEviction
from draft_rag.scoring import ObserverScores, ScoreReduction, prefill
from draft_rag.specpc import SpecPC
from draft_rag.specpc.draft_pass import greedy_tokens
from tests.syncs import host_reads
from tests.test_draft_pass import PROMPT, generated
from tests.test_speckv import LONG_PROMPT, PROSE


class AheadCopies(HostCopies):
    """:class:`HostCopies` in CUDA's order on the CPU: stop checks are read after the next step is queued."""

    def __init__(self, rows: int, width: int, device: torch.device) -> None:
        super().__init__(rows, width, device)
        self.overlaps = True


# --- the greedy draft loop ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [2, 16])
def test_greedy_tokens_read_nothing_per_token(tiny_qwen, max_tokens):
    cache, logits = prefill(tiny_qwen.model, PROMPT)
    with host_reads() as reads:
        tokens = greedy_tokens(tiny_qwen.model, cache, logits, max_tokens, {1, 2}, feed_last=True)
    assert len(tokens) == max_tokens
    # One numpy view of the host buffer per call, whatever the number of tokens (before: two .item() a token).
    assert reads == ["draft_rag.decoding:" + reads[0].split(":")[1]] and reads[0].endswith(" numpy")


@pytest.mark.parametrize("feed_last", [False, True])
@pytest.mark.parametrize("stop_at", [0, 5, None])
def test_greedy_tokens_in_cuda_order_equal_the_plain_loop(tiny_qwen, monkeypatch, feed_last, stop_at):
    expected = generated(tiny_qwen, 12)
    stops = set() if stop_at is None else {expected[stop_at]}
    length = len(expected) if stop_at is None else expected.index(expected[stop_at])
    results = []
    for copies in (HostCopies, AheadCopies):
        monkeypatch.setattr(decoding, "HostCopies", copies)
        cache, logits = prefill(tiny_qwen.model, PROMPT)
        tokens = greedy_tokens(tiny_qwen.model, cache, logits, 12, stops, feed_last=feed_last)
        results.append((tokens, cache.get_seq_length(), cache.layers[0].keys.clone()))
    (tokens, seq, keys), (ahead_tokens, ahead_seq, ahead_keys) = results
    assert tokens == ahead_tokens == expected[:length]
    ran = length if feed_last or stop_at is not None else length - 1
    assert seq == ahead_seq == PROMPT.shape[1] + ran  # the stop token's entry is cropped again
    assert torch.equal(keys, ahead_keys)


@pytest.mark.parametrize("reduction", [ScoreReduction(), ScoreReduction(heads="mean", observers="mean")])
def test_a_stop_token_run_ahead_leaves_the_scores_unchanged(tiny_qwen, monkeypatch, reduction):
    """SpecPC's lookahead observes; in CUDA order the stop token runs, gated out of the scores."""
    stop = generated(tiny_qwen, 12)[6]
    scores = []
    for copies in (HostCopies, AheadCopies):
        monkeypatch.setattr(decoding, "HostCopies", copies)
        cache, logits = None, None
        with ObserverScores(tiny_qwen.model, 4, 8 + 12, reduction) as scorer:
            cache, logits = prefill(tiny_qwen.model, PROMPT)
            greedy_tokens(tiny_qwen.model, cache, logits, 12, {stop}, feed_last=True, scorer=scorer)
        scores.append(scorer.scores()[..., : PROMPT.shape[1] + 6])
    assert torch.equal(scores[0], scores[1])


def test_gated_rows_add_nothing(tiny_qwen):
    ids = torch.randint(3, tiny_qwen.model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    for reduction in (ScoreReduction(), ScoreReduction(observers="mean")):
        with ObserverScores(tiny_qwen.model, 20, 10, reduction) as alone:
            prefill(tiny_qwen.model, ids[:, :25])
        with ObserverScores(tiny_qwen.model, 20, 10, reduction) as gated:
            cache, _ = prefill(tiny_qwen.model, ids[:, :25])
            gated.gate(torch.tensor(False))
            prefill(tiny_qwen.model, ids[:, 25:], cache)
        assert torch.equal(gated.scores()[..., :25], alone.scores())


def test_specpc_lookahead_reads_nothing_per_token(tiny_qwen):
    documents = [PROSE * 3, "A special magic number is hidden in the text: 4071. " * 4]
    counts = []
    for lookahead in (2, 12):
        pc = SpecPC(draft=tiny_qwen, budget=30, window_size=8, lookahead_tokens=lookahead, starting_layer_index=0,
                    progress=False)
        with host_reads() as reads:
            pc.score("What is the magic number?", documents)
        counts.append([read for read in reads if "draft_pass" in read or "scoring" in read or "decoding" in read])
    assert counts[0] == counts[1]


# --- the engine's decode loop and sampling ---------------------------------------------------------------


@pytest.mark.parametrize("knobs", [{}, {"temperature": 1.1, "top_p": 0.8, "seed": 4}])
def test_decode_reads_the_tokens_once_per_step_for_the_whole_batch(tiny_pair, knobs):
    draft, target = tiny_pair
    engine = SpecKV(target=target, draft=draft, method="snapkv", budget=40, window_size=8)
    prompts = [LONG_PROMPT, "hello there", PROSE * 2 + "Which model decides?"]
    with host_reads() as reads:
        results = engine.generate(prompts, max_new_tokens=9, **knobs)
    steps = max(len(result.token_ids) for result in results)
    loop_reads = [read for read in reads if read.startswith(("draft_rag.engine", "draft_rag.decoding"))]
    assert len(loop_reads) == steps and all(read.endswith(" tolist") for read in loop_reads)


def test_sampler_picks_every_row_on_the_logits_device():
    logits = torch.tensor([[0.0, 5.0, 1.0], [9.0, 0.0, 1.0]])
    greedy = Sampler()(logits)
    assert greedy.tolist() == [1, 0] and greedy.device == logits.device
    sampled = Sampler(temperature=0.5, seed=3)(logits * 10)
    assert sampled.shape == (2,) and sampled.tolist() == [1, 0]
    meta = torch.zeros(4, 7, device="meta")
    assert Sampler()(meta).device.type == "meta"  # nothing is copied to the host


def test_seeded_sampling_draws_what_a_seeded_cpu_generator_draws():
    """On the CPU the device generator is a CPU generator: a seed gives the same tokens as before."""
    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 3
    sampler = Sampler(temperature=0.7, top_p=0.9, seed=11)
    got = [int(sampler(logits)) for _ in range(40)]
    generator = torch.Generator().manual_seed(11)
    probs = (logits[0] / 0.7).softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    nucleus = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(
        sorted_probs.cumsum(0) - sorted_probs >= 0.9, 0.0))
    assert got == [int(torch.multinomial(nucleus, 1, generator=generator)) for _ in range(40)]
    assert got == [int(Sampler(temperature=0.7, top_p=0.9, seed=11)(logits)) for _ in range(1)] + got[1:]


def test_sampling_follows_the_nucleus_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    probs = logits[0].softmax(-1)
    keep = probs.sort(descending=True).values.cumsum(0) - probs.sort(descending=True).values < 0.8
    nucleus = torch.where(probs >= probs.sort(descending=True).values[keep].min(), probs, 0.0)
    nucleus /= nucleus.sum()
    sampler = Sampler(temperature=1.0, top_p=0.8, seed=0)
    draws = torch.cat([sample_rows(logits.expand(500, -1), [sampler] * 500) for _ in range(8)])
    frequencies = torch.bincount(draws, minlength=5).float() / len(draws)
    assert frequencies[nucleus == 0].sum() == 0
    torch.testing.assert_close(frequencies, nucleus, atol=0.03, rtol=0)


def test_greedy_rows_are_one_argmax():
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_rows(logits, [Sampler()] * 5), logits.argmax(-1))


# --- the observer block size -------------------------------------------------------------------------------


@pytest.fixture
def observed_rows(monkeypatch):
    rows: list[int] = []
    real = scoring.observer_attention

    def spy(query, *args):
        rows.append(query.shape[2])
        return real(query, *args)

    monkeypatch.setattr(scoring, "observer_attention", spy)
    return rows


def test_specpc_and_speckv_take_the_observer_block_size(tiny_pair, observed_rows):
    draft, target = tiny_pair
    documents = [PROSE * 3, "A special magic number is hidden in the text: 4071. " * 4]
    settings = {"draft": draft, "budget": 30, "window_size": 20, "starting_layer_index": 0, "progress": False,
                "observe_from": "window"}
    texts = []
    for block in (None, 3):
        observed_rows.clear()
        texts.append(SpecPC(**settings, observer_block_size=block).compress("What is the magic number?", documents))
        assert max(observed_rows) == (20 if block is None else 3)
    assert texts[0].texts == texts[1].texts
    answers = []
    for block in (None, 5):
        observed_rows.clear()
        engine = SpecKV(target=target, draft=draft, budget=50, window_size=36, lookahead_tokens=6,
                        observer_block_size=block)
        answers.append(engine.generate(LONG_PROMPT, max_new_tokens=4).token_ids)
        assert max(observed_rows) == (scoring.OBSERVER_BLOCK_SIZE if block is None else 5)
    assert answers[0] == answers[1]
    assert "observer_block_size" not in SpecPC(**settings, observer_block_size=3).settings()


@pytest.mark.parametrize("block", [0, -2, 2.5, "8"])
def test_observer_block_size_is_checked(tiny_pair, block):
    draft, target = tiny_pair
    with pytest.raises((TypeError, ValueError), match="observer_block_size"):
        SpecPC(draft=draft, observer_block_size=block)
    with pytest.raises((TypeError, ValueError), match="observer_block_size"):
        SpecKV(target=target, draft=draft, observer_block_size=block)
    with pytest.raises((TypeError, ValueError), match="observer_block_size"):
        SnapKVEviction(observer_block_size=block)


def test_eviction_settings_leave_the_observer_block_size_out(tiny_pair):
    draft, target = tiny_pair
    engine = SpecKV(target=target, draft=draft, observer_block_size=4)
    assert engine.eviction.observer_block_size == 4 and "observer_block_size" not in engine.settings()
    assert SnapKVEviction(64, 16) == SnapKVEviction(64, 16, observer_block_size=2)  # positional fields unchanged
