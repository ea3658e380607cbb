"""The ``llmlingua`` method's plumbing: the worker protocol, the parent's client, the skip message.

No llmlingua here: a fake worker speaks the protocol, and the real worker's request loop is driven
in-process for the requests that need no model.
"""

from __future__ import annotations

import io
import json
import sys
import textwrap
import time

import pytest

from draft_rag.bench import llmlingua_worker
from draft_rag.bench.longllmlingua import (
    LLMLINGUA_PYTHON,
    LLMLinguaWorker,
    LongLLMLingua,
    llmlingua_compressors,
    llmlingua_python,
)
from draft_rag.bench.methods import PromptCompression, build_methods, unavailable_reason
from draft_rag.bench.tasks import TaskGenerator
from tests.tiny import tiny_tokenizer

# Answers like the real worker: keeps the first `budget` words of the documents (one text, most relevant
# first would be LongLLMLingua's job), fails on request, or dies.
FAKE_WORKER = textwrap.dedent(
    """
    import json, sys
    loaded = None
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            break
        if request["op"] == "load":
            loaded = request
            print("loading...", file=sys.stderr)
            reply = {"ok": True}
        elif request["question"] == "die":
            print("worker fell over", file=sys.stderr)
            sys.exit(3)
        elif request["question"] == "fail":
            reply = {"ok": False, "error": "ValueError: bad question"}
        else:
            words = " ".join(request["documents"]).split()
            text = " ".join(words[: request["budget"] * 2])
            reply = {"ok": True, "text": text, "kept_tokens": len(words), "loaded": loaded}
            if request["question"] == "asked before":
                reply["reused_s"] = 5.0
        reply["seconds"] = 0.01
        print(json.dumps(reply), flush=True)
    """
)


@pytest.fixture
def worker(tmp_path):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    made = LLMLinguaWorker(tmp_path / "python", "/models/draft", "/tokenizers/draft", dtype="bfloat16", threads=1,
                           command=[sys.executable, str(script)])
    yield made
    made.close()


def test_worker_loads_once_and_answers_compress_requests(worker):
    worker.start()
    reply = worker.request({"op": "compress", "question": "q", "documents": ["a b c", "d e"], "budget": 2})
    assert reply["text"] == "a b c d"
    assert reply["loaded"] == {"op": "load", "model": "/models/draft", "tokenizer": "/tokenizers/draft",
                               "dtype": "bfloat16", "threads": 1}
    process = worker._process
    worker.start()
    assert worker._process is process  # kept, not restarted


def test_longllmlingua_counts_target_tokens_and_keeps_the_budget(worker):
    tokenizer = tiny_tokenizer()
    documents = ["The quick brown fox jumps over the lazy dog. " * 8, "A special magic number is hidden. " * 8]
    result = LongLLMLingua(worker, 12, tokenizer).compress("What is the number?", documents)
    assert len(result.documents) == 1 and not result.documents[0].dropped
    kept = result.documents[0].text
    assert 0 < result.total_kept_tokens <= 12
    assert len(tokenizer(kept, add_special_tokens=False)["input_ids"]) <= 13
    assert kept.startswith("The quick")


def test_a_reused_ranking_counts_in_each_budgets_time(worker):
    tokenizer = tiny_tokenizer()
    fresh = LongLLMLingua(worker, 12, tokenizer).compress("first time", ["a b c"])
    reused = LongLLMLingua(worker, 24, tokenizer).compress("asked before", ["a b c"])
    assert fresh.seconds < 5.0 <= reused.seconds


def test_last_result_computes_once_per_arguments_and_hands_out_copies():
    calls = []

    def rank(context, question):
        calls.append(question)
        time.sleep(0.01)
        return [(i, float(len(doc))) for i, doc in enumerate(context)]

    last = llmlingua_worker.LastResult()
    first = last(rank, ["aa", "b"], "q")
    first.append("changed by the caller")
    again = last(rank, ["aa", "b"], "q")
    assert again == [(0, 2.0), (1, 1.0)] and calls == ["q"]
    assert last.take_reused() >= 0.01 and last.take_reused() == 0.0
    assert last(rank, ["aa", "b"], "other") == again and calls == ["q", "other"]
    assert last.take_reused() == 0.0

    def broken(*_):
        raise ValueError("no")

    with pytest.raises(ValueError):
        last(broken, ["c"], "q")
    assert last(rank, ["c"], "q") == [(0, 1.0)]  # a failed call leaves nothing to reuse


def test_worker_errors_carry_the_workers_words(worker):
    worker.start()
    with pytest.raises(RuntimeError, match="bad question"):
        worker.request({"op": "compress", "question": "fail", "documents": ["x"], "budget": 4})
    # A failed request leaves the worker serving.
    assert worker.request({"op": "compress", "question": "q", "documents": ["x y"], "budget": 4})["text"] == "x y"
    with pytest.raises(RuntimeError, match="(?s)stopped.*worker fell over"):
        worker.request({"op": "compress", "question": "die", "documents": ["x"], "budget": 4})


def test_loading_the_draft_is_not_counted_as_compressing(worker):
    class Answer:
        text, prompt_tokens, kv_bytes_kept = "42", 10, 1024

    class FakeAnswerer:
        def answer(self, prompt, max_new_tokens):
            self.prompt = prompt
            return Answer(), 0.5

    answerer = FakeAnswerer()
    worker.command[1:1] = ["-c", "import time, runpy, sys; time.sleep(3); runpy.run_path(sys.argv[1])"]
    method = PromptCompression("llmlingua", llmlingua_compressors(worker, tiny_tokenizer()), answerer)
    sample = TaskGenerator(tiny_tokenizer(), chunk_tokens=64).sample("qa", 600, 0)
    outcome = method.run(sample, 32)
    assert outcome.compress_s < 2.0
    assert "[Document 1]" in answerer.prompt and "[Document 2]" not in answerer.prompt
    assert 0 < outcome.context_tokens <= 32


def test_real_worker_loop_answers_bad_requests_and_quits():
    requests = io.StringIO(
        "\n".join([
            json.dumps({"op": "compress", "question": "q", "documents": ["x"], "budget": 4}),
            "not json",
            json.dumps({"op": "fly"}),
            "",
            json.dumps({"op": "quit"}),
            json.dumps({"op": "fly"}),
        ])
    )
    answers = io.StringIO()
    llmlingua_worker.serve(requests, answers)
    replies = [json.loads(line) for line in answers.getvalue().splitlines()]
    assert len(replies) == 3 and not any(r["ok"] for r in replies)
    assert "load" in replies[0]["error"] and "JSONDecodeError" in replies[1]["error"]
    assert "unknown op 'fly'" in replies[2]["error"]
    assert all(r["seconds"] >= 0 for r in replies)


def test_documented_longllmlingua_settings():
    settings = llmlingua_worker.LONGLLMLINGUA_SETTINGS
    assert settings["rank_method"] == "longllmlingua" and settings["use_context_level_filter"]
    assert settings["condition_compare"] and settings["reorder_context"] == "sort"
    assert settings["dynamic_context_compression_ratio"] == 0.4 and settings["context_budget"] == "+100"


def test_missing_environment_is_skipped_with_the_command_that_makes_it(monkeypatch, tmp_path, tiny_pair):
    monkeypatch.setenv(LLMLINGUA_PYTHON, str(tmp_path / "nowhere" / "python"))
    assert llmlingua_python() is None
    reason = unavailable_reason("llmlingua")
    assert "bash scripts/llmlingua-env.sh" in reason and LLMLINGUA_PYTHON in reason
    draft, target = tiny_pair
    methods, skipped = build_methods(["llmlingua"], draft=draft, target=target)
    assert list(methods) == ["full"] and skipped == {"llmlingua": reason}


def test_a_draft_without_files_is_skipped(monkeypatch, tiny_pair):
    monkeypatch.setenv(LLMLINGUA_PYTHON, sys.executable)
    assert unavailable_reason("llmlingua") is None
    draft, target = tiny_pair
    _, skipped = build_methods(["llmlingua"], draft=draft, target=target)
    assert "has none" in skipped["llmlingua"]
