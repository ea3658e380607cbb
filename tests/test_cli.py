"""The compress command end to end on a tiny model saved to disk."""

from __future__ import annotations

import io
import json

from draft_rag import cli
from tests.tiny import saved, tiny_model


def test_compress_json(draft_dir, tmp_path, capsys, monkeypatch):
    first = tmp_path / "a.txt"
    first.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    monkeypatch.setattr("sys.stdin", io.StringIO("A special magic number is hidden in the text. " * 6))
    code = cli.main(["compress", "--query", "What is the magic number?", "--budget", "30",
                     "--draft", str(draft_dir), "--dtype", "float32", "--json", str(first), "-"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert set(payload) == {"documents", "budget", "total_kept_tokens", "dtype", "seconds"}
    assert payload["dtype"] == "float32" and payload["seconds"] > 0
    assert payload["budget"] == 30 and payload["total_kept_tokens"] <= 30
    assert [d["source"] for d in payload["documents"]] == [str(first), "-"]
    assert payload["total_kept_tokens"] == sum(d["kept_tokens"] for d in payload["documents"])
    source = first.read_text()
    for start, end in payload["documents"][0]["spans"]:
        assert source[start:end] in payload["documents"][0]["text"]


def test_compress_text_output(draft_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("Retrieval augmented generation reads long documents. " * 5)
    assert cli.main(["compress", "--query", "What reads documents?", "--budget", "1000",
                     "--draft", str(draft_dir), str(doc)]) == 0
    out = capsys.readouterr().out
    assert doc.read_text() in out  # fits the budget: unchanged


def test_errors_are_clean(draft_dir, tmp_path, capsys):
    assert cli.main(["compress", "--query", "q", "--budget", "10", "--draft", str(draft_dir),
                     str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    doc = tmp_path / "doc.txt"
    doc.write_text("text")
    assert cli.main(["compress", "--query", " ", "--budget", "10", "--draft", str(draft_dir), str(doc)]) == 2
    assert "query is empty" in capsys.readouterr().err
    assert cli.main(["compress", "--query", "q", "--budget", "0", "--draft", str(draft_dir), str(doc)]) == 2
    assert "budget" in capsys.readouterr().err


def test_unsupported_draft_attention_is_a_clean_error(tmp_path, capsys):
    windowed = tiny_model("qwen2", seed=11, use_sliding_window=True, sliding_window=16, max_window_layers=0)
    draft = saved(windowed, tmp_path / "windowed")
    doc = tmp_path / "doc.txt"
    doc.write_text("Retrieval augmented generation reads long documents. " * 5)
    assert cli.main(["compress", "--query", "q?", "--budget", "10", "--draft", str(draft), str(doc)]) == 2
    assert "window of 16" in capsys.readouterr().err
