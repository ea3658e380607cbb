"""``draft-rag ask`` end to end on tiny models saved to disk."""

from __future__ import annotations

import json

import pytest

from draft_rag.cli import main
from tests.test_speckv import LONG_PROMPT, PROSE


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_pair):
    root = tmp_path_factory.mktemp("models")
    paths = []
    for name, loaded in zip(("draft", "target"), tiny_pair):
        path = root / name
        loaded.model.save_pretrained(path)
        loaded.tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths


@pytest.fixture()
def context_file(tmp_path):
    path = tmp_path / "context.txt"
    path.write_text(PROSE * 6, encoding="utf-8")
    return str(path)


def ask(model_dirs, *extra):
    draft, target = model_dirs
    return main(["ask", "--draft", draft, "--target", target, "--max-new-tokens", "6", *extra])


@pytest.mark.parametrize("method", ["speckv", "full"])
def test_ask_json(method, model_dirs, context_file, capsys):
    code = ask(
        model_dirs,
        "--query",
        "What is the number?",
        "--context",
        context_file,
        "--method",
        method,
        "--kv-budget",
        "40",
        "--window-size",
        "8",
        "--json",
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {
        "answer",
        "method",
        "dtype",
        "kv_budget",
        "prompt_tokens",
        "kv_entries_kept",
        "kv_entries_full",
        "timings",
    }
    assert report["method"] == method
    assert report["dtype"] in ("float32", "bfloat16")
    assert report["prompt_tokens"] > 100
    assert report["kv_entries_full"] == report["prompt_tokens"]
    if method == "full":
        assert report["kv_budget"] is None and report["kv_entries_kept"] == report["prompt_tokens"]
    else:
        assert report["kv_budget"] == 40 and report["kv_entries_kept"] == 40
    assert {"draft_s", "prefill_s", "ttft_s", "decode_s", "tokens_per_s"} <= set(report["timings"])


def test_ask_streams_the_same_answer(model_dirs, capsys):
    query = LONG_PROMPT
    assert (
        ask(
            model_dirs,
            "--query",
            query,
            "--method",
            "snapkv",
            "--kv-budget",
            "40",
            "--window-size",
            "8",
            "--json",
        )
        == 0
    )
    answer = json.loads(capsys.readouterr().out)["answer"]
    assert (
        ask(model_dirs, "--query", query, "--method", "snapkv", "--kv-budget", "40", "--window-size", "8")
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out == answer + "\n"
    assert "KV kept 40/" in captured.err


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        (["--kv-budget", "0"], "budget"),
        (["--kv-budget", "16", "--window-size", "16"], "window_size"),
        (["--context", "/nonexistent/file.txt"], "does not exist"),
    ],
)
def test_ask_bad_input_exits_2(extra, error, model_dirs, capsys):
    assert ask(model_dirs, "--query", "What?", *extra) == 2
    assert error in capsys.readouterr().err
