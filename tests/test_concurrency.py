"""Shared models and streams across threads: every result equals its sequential one, nothing deadlocks.

Threads are daemons joined with a timeout, so a deadlock fails the test instead of hanging the run.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import replace
from typing import Any

import pytest

from draft_rag import SpecPC
from draft_rag.engine import GenerationResult, SpecKV
from tests.test_speckv import LONG_PROMPT
from tests.test_specpc import DOCS, QUERY
from tests.tiny import tiny_model

TIMEOUT = 180
OTHER_PROMPT = "What does the small draft model decide? Answer in one sentence."


@pytest.fixture(scope="module")
def shared_draft():
    return tiny_model("qwen2", seed=7)


@pytest.fixture(scope="module")
def target():
    return tiny_model("qwen2", seed=3, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                      num_hidden_layers=3)


def run_in_threads(jobs: list[Callable[[], Any]], timeout: float = TIMEOUT) -> list[Any]:
    """Start every job in its own daemon thread at the same moment; return their results in order."""
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def work(index: int, job: Callable[[], Any]) -> None:
        try:
            barrier.wait(timeout)
            results[index] = job()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i, job), daemon=True) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), f"threads still running after {timeout}s (deadlock)"
    if errors:
        raise errors[0]
    return results


def drain(stream: Generator[str, None, GenerationResult]) -> tuple[list[str], GenerationResult]:
    """All remaining pieces of a stream and its result."""
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as finished:
            return pieces, finished.value


def test_specpc_and_speckv_sharing_a_draft_match_sequential_results(shared_draft, target):
    compressor = SpecPC(draft=shared_draft, budget=48, window_size=8, kernel_size=5, neighbor_tokens=6,
                        starting_layer_index=1, lookahead_tokens=4)  # reads apart, each call with its own cache
    joint = replace(compressor, reading="joint")
    recomputing = replace(compressor, budget=16, recompute_factor=2)  # the call's cache serves the second pass
    engine = SpecKV(target=target, draft=shared_draft, budget=40, window_size=8)
    on_the_draft = SpecKV(target=shared_draft, method="snapkv", budget=40, window_size=8)
    jobs = [
        lambda: compressor.compress(QUERY, DOCS).texts,
        lambda: compressor.compress(QUERY, DOCS[::-1]).texts,
        lambda: joint.compress(QUERY, DOCS).texts,
        lambda: recomputing.compress(QUERY, DOCS).texts,
        lambda: engine.generate(LONG_PROMPT, max_new_tokens=12).token_ids,
        lambda: "".join(engine.stream(LONG_PROMPT + " Be brief.", max_new_tokens=12)),
        lambda: on_the_draft.generate(LONG_PROMPT, max_new_tokens=12).token_ids,
        lambda: on_the_draft.generate(LONG_PROMPT, max_new_tokens=8, temperature=1.0, seed=3).token_ids,
    ]
    expected = [job() for job in jobs]
    assert run_in_threads(jobs * 2) == expected * 2


def test_rescoring_and_recomputing_over_a_shared_draft_cache_match_sequential_results(shared_draft):
    from draft_rag import DraftCache

    cache = DraftCache()
    settings = dict(window_size=8, kernel_size=5, neighbor_tokens=6, starting_layer_index=1, cache=cache)
    rescoring = SpecPC(draft=shared_draft, budget=16, rescore_factor=2, **settings)
    question = SpecPC(draft=shared_draft, budget=16, rescore_factor=3, observe_from="question", **settings)
    recomputing = SpecPC(draft=shared_draft, budget=16, recompute_factor=2, **settings)
    recomputing_question = SpecPC(draft=shared_draft, budget=12, recompute_factor=3, observe_from="question",
                                  **settings)
    jobs = [
        lambda: rescoring.compress(QUERY, DOCS).texts,
        lambda: rescoring.compress(QUERY, DOCS[::-1]).texts,
        lambda: question.compress(QUERY, DOCS).texts,
        lambda: question.compress("Which fox jumps?", DOCS).texts,
        lambda: recomputing.compress(QUERY, DOCS).texts,
        lambda: recomputing.compress(QUERY, DOCS[::-1]).texts,
        lambda: recomputing_question.compress("Which fox jumps?", DOCS).texts,
    ]
    expected = [job() for job in jobs]
    cache.clear()  # the threads encode the documents again, racing for the same entries
    assert run_in_threads(jobs * 3) == expected * 3


def test_paused_stream_does_not_block_the_same_engine_in_the_same_thread(shared_draft, target):
    engine = SpecKV(target=target, draft=shared_draft, budget=40, window_size=8)
    expected = engine.generate(LONG_PROMPT, max_new_tokens=20)
    expected_other = engine.generate(OTHER_PROMPT, max_new_tokens=8)

    def interleaved() -> tuple[str, GenerationResult, list[str], GenerationResult]:
        stream = engine.stream(LONG_PROMPT, max_new_tokens=20)
        first = next(stream)
        other = engine.generate(OTHER_PROMPT, max_new_tokens=8)
        rest, result = drain(stream)
        return first, other, rest, result

    [(first, other, rest, result)] = run_in_threads([interleaved])
    assert other.token_ids == expected_other.token_ids
    assert result.token_ids == expected.token_ids
    assert first + "".join(rest) == result.text == expected.text


def test_two_streams_interleaved_step_by_step(shared_draft, target):
    """Decode steps of different generations alternate on one model, each over its own cache."""
    engine = SpecKV(target=target, draft=shared_draft, method="snapkv", budget=40, window_size=8)
    prompts = [LONG_PROMPT, OTHER_PROMPT]
    expected = [engine.generate(prompt, max_new_tokens=15).text for prompt in prompts]

    def alternate() -> list[str]:
        streams = [engine.stream(prompt, max_new_tokens=15) for prompt in prompts]
        texts = ["", ""]
        finished = [False, False]
        while not all(finished):
            for index, stream in enumerate(streams):
                if not finished[index]:
                    try:
                        texts[index] += next(stream)
                    except StopIteration:
                        finished[index] = True
        return texts

    assert run_in_threads([alternate]) == [expected]


def test_many_threads_streaming_at_once(shared_draft, target):
    engine = SpecKV(target=target, draft=shared_draft, budget=40, window_size=8)
    prompts = [f"{LONG_PROMPT} Question {index}." for index in range(8)]
    expected = [engine.generate(prompt, max_new_tokens=10).text for prompt in prompts]
    jobs = [lambda prompt=prompt: "".join(engine.stream(prompt, max_new_tokens=10)) for prompt in prompts]
    assert run_in_threads(jobs) == expected


def test_streams_stepped_on_a_small_thread_pool_finish(shared_draft, target):
    """Like an async adapter: each step of each stream runs on whichever of 3 pool threads is free."""
    engine = SpecKV(target=target, draft=shared_draft, budget=40, window_size=8)
    prompts = [f"{OTHER_PROMPT} Case {index}." for index in range(8)]
    expected = [engine.generate(prompt, max_new_tokens=10).token_ids for prompt in prompts]
    streams = [engine.stream(prompt, max_new_tokens=10) for prompt in prompts]
    steps: queue.Queue[int] = queue.Queue()
    for index in range(len(streams)):
        steps.put(index)
    results: dict[int, GenerationResult] = {}
    errors: list[BaseException] = []
    done = threading.Event()

    def pool_thread() -> None:
        while not done.is_set():
            try:
                index = steps.get(timeout=0.05)
            except queue.Empty:
                continue
            try:
                next(streams[index])
                steps.put(index)
            except StopIteration as finished:
                results[index] = finished.value
                if len(results) == len(streams):
                    done.set()
            except BaseException as error:
                errors.append(error)
                done.set()

    for _ in range(3):
        threading.Thread(target=pool_thread, daemon=True).start()
    assert done.wait(TIMEOUT), "streams stepped on a thread pool did not finish (deadlock)"
    assert not errors
    assert [results[index].token_ids for index in range(len(streams))] == expected


def test_speckv_computes_under_the_models_own_lock(shared_draft, target):
    """An engine waits while anyone else (here: this test) holds the shared model's lock."""
    engine = SpecKV(target=target, method="full")
    finished = threading.Event()

    def generate() -> None:
        engine.generate(OTHER_PROMPT, max_new_tokens=2)
        finished.set()

    with target.lock:
        threading.Thread(target=generate, daemon=True).start()
        assert not finished.wait(1.0)
    assert finished.wait(TIMEOUT)
