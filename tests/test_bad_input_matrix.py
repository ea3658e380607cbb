"""Bad input over the whole public surface: a clear error naming the argument, or a documented pass-through.

One row per (surface, input). Every error must be raised as a ``TypeError``/``ValueError`` (or, for
unsupported models, ``NotImplementedError``) whose message names the offending argument; the command line
must exit with status 2 and say the same on stderr. Pass-through rows check the documented result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from draft_rag import SpecKV, SpecPC, cli
from tests.tiny import tiny_model

DOC = "The quick brown fox jumps over the lazy dog. A special magic number is hidden in the text. " * 4
TOO_LONG = "apple " * 5000  # over the tiny models' 4096-position context


@pytest.fixture(scope="module")
def draft():
    return tiny_model("qwen2", seed=21)


@pytest.fixture(scope="module")
def engine(draft):
    return SpecKV(target=tiny_model("qwen2", seed=22), draft=draft, budget=40, window_size=8)


def specpc(draft, **settings: Any) -> SpecPC:
    return SpecPC(draft=draft, budget=settings.pop("budget", 24), kernel_size=4, neighbor_tokens=4, **settings)


SPECPC_ERRORS: list[tuple[str, Callable[[Any], Any], type[Exception], str]] = [
    ("empty query", lambda d: specpc(d).compress("", [DOC]), ValueError, "query"),
    ("whitespace query", lambda d: specpc(d).compress("  \n", [DOC]), ValueError, "query"),
    ("None query", lambda d: specpc(d).compress(None, [DOC]), TypeError, "query"),
    ("query with a lone surrogate", lambda d: specpc(d).compress("why\ud800?", [DOC]), ValueError, "query"),
    ("a string for documents", lambda d: specpc(d).compress("q?", DOC), TypeError, "documents"),
    ("None documents", lambda d: specpc(d).compress("q?", None), TypeError, "documents"),
    ("bytes document", lambda d: specpc(d).compress("q?", [DOC, b"bytes"]), TypeError, "documents[1]"),
    ("None document", lambda d: specpc(d).compress("q?", [None]), TypeError, "documents[0]"),
    ("number document", lambda d: specpc(d).compress("q?", [DOC, 3]), TypeError, "documents[1]"),
    ("document with a lone surrogate", lambda d: specpc(d).compress("q?", ["a\udcffb " * 50]), ValueError,
     "documents[0]"),
    ("budget 0", lambda d: specpc(d, budget=0), ValueError, "budget"),
    ("budget -1", lambda d: specpc(d, budget=-1), ValueError, "budget"),
    ("budget 1.5", lambda d: specpc(d, budget=1.5), TypeError, "budget"),
    ("budget True", lambda d: specpc(d, budget=True), TypeError, "budget"),
    ("window_size '64'", lambda d: specpc(d, window_size="64"), TypeError, "window_size"),
    ("elision_marker None", lambda d: specpc(d, elision_marker=None), TypeError, "elision_marker"),
    ("elision_marker bytes", lambda d: specpc(d, elision_marker=b"..."), TypeError, "elision_marker"),
    ("elision_marker with a lone surrogate", lambda d: specpc(d, elision_marker=" \ud800 "), ValueError,
     "elision_marker"),
    ("documents past the draft's context", lambda d: specpc(d).compress("q?", [TOO_LONG]), ValueError, "context"),
    ("query past the draft's context", lambda d: specpc(d).compress(TOO_LONG, [DOC]), ValueError, "query"),
]


@pytest.mark.parametrize(("case", "call", "error", "named"), SPECPC_ERRORS, ids=[c[0] for c in SPECPC_ERRORS])
def test_specpc_rejects(draft, case, call, error, named):
    with pytest.raises(error, match=named.replace("[", r"\[").replace("]", r"\]")):
        call(draft)


def test_specpc_passes_through(draft):
    assert specpc(draft).compress("q?", []).documents == []
    nul = specpc(draft).compress("What is the magic number?", [DOC.replace("fox", "fo\x00x")])
    assert nul.total_kept_tokens <= 24 and nul.documents[0].spans
    blank = specpc(draft).compress("What is the magic number?", [" " * 300, DOC])
    assert blank.documents[0].text == "" and blank.documents[0].blank and not blank.documents[0].dropped
    assert blank.documents[1].spans and blank.total_kept_tokens <= 24
    assert specpc(draft, budget=1).compress("What is the magic number?", [DOC]).total_kept_tokens <= 1
    joined = specpc(draft, elision_marker="").compress("What is the magic number?", [DOC]).documents[0]
    assert len(joined.spans) > 1 and joined.text == "".join(DOC[s:e] for s, e in joined.spans)


SPECKV_ERRORS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("empty prompt", {"prompt": ""}, ValueError, "prompt"),
    ("None prompt", {"prompt": None}, TypeError, "prompt"),
    ("bytes prompt", {"prompt": b"hello"}, TypeError, "prompt"),
    ("prompt with a lone surrogate", {"prompt": "hi \ud800"}, ValueError, "prompt"),
    ("unknown chat role", {"prompt": [{"role": "robot", "content": "hi"}]}, ValueError, "role"),
    ("message without content", {"prompt": [{"role": "user"}]}, ValueError, "content"),
    ("None content", {"prompt": [{"role": "user", "content": None}]}, ValueError, "content"),
    ("image block", {"prompt": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     TypeError, "prompt"),
    ("prompt past the context", {"prompt": TOO_LONG}, ValueError, "context"),
    ("max_new_tokens 0", {"max_new_tokens": 0}, ValueError, "max_new_tokens"),
    ("max_new_tokens -1", {"max_new_tokens": -1}, ValueError, "max_new_tokens"),
    ("max_new_tokens 2.0", {"max_new_tokens": 2.0}, TypeError, "max_new_tokens"),
    ("top_p 0", {"top_p": 0.0}, ValueError, "top_p"),
    ("top_p 1.5", {"top_p": 1.5}, ValueError, "top_p"),
    ("negative temperature", {"temperature": -1.0}, ValueError, "temperature"),
    ("NaN temperature", {"temperature": float("nan")}, ValueError, "temperature"),
    ("string temperature", {"temperature": "hot"}, TypeError, "temperature"),
    ("stop=5", {"stop": 5}, TypeError, "stop"),
    ("stop with a number", {"stop": ["a", 5]}, TypeError, "stop"),
]


@pytest.mark.parametrize(("case", "change", "error", "named"), SPECKV_ERRORS, ids=[c[0] for c in SPECKV_ERRORS])
@pytest.mark.parametrize("mode", ["generate", "stream"])
def test_speckv_rejects(engine, mode, case, change, error, named):
    call = {"prompt": "What is the magic number?", "max_new_tokens": 4, **change}
    with pytest.raises(error, match=named):
        result = getattr(engine, mode)(call.pop("prompt"), **call)
        if mode == "stream":
            list(result)


def test_speckv_passes_through(engine):
    plain = engine.generate("What is the magic number?", max_new_tokens=4)
    assert engine.generate("What is the magic number?", max_new_tokens=4, stop=[""]).text == plain.text
    assert engine.generate([{"role": "user", "content": [{"type": "text", "text": "What is the magic number?"}]}],
                           max_new_tokens=4).text == plain.text
    assert engine.generate("What is the\x00 magic number?", max_new_tokens=4).completion_tokens == 4


def test_adapters_reject(draft, engine):
    from langchain_core.documents import Document
    from langchain_draft_rag import ChatDraftRAG, DraftContextCompressor
    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.llms.draft_rag import DraftRAGLLM
    from llama_index.postprocessor.draft_rag import DraftNodePostprocessor
    from pydantic import ValidationError

    compressor = DraftContextCompressor(draft=draft, budget=24)
    with pytest.raises(TypeError, match="documents"):
        compressor.compress_documents(None, "q?")
    with pytest.raises(TypeError, match=r"documents\[1\]"):
        compressor.compress_documents([Document(page_content=DOC), "text"], "q?")
    with pytest.raises(ValueError, match="query"):
        compressor.compress_documents([Document(page_content=DOC)], " ")
    with pytest.raises(ValidationError, match="budget"):
        DraftContextCompressor(draft=draft, budget=0)

    postprocessor = DraftNodePostprocessor(draft=draft, budget=24)
    with pytest.raises(TypeError, match=r"nodes\[0\]"):
        postprocessor.postprocess_nodes([TextNode(text=DOC)], query_str="q?")
    with pytest.raises(TypeError, match="nodes"):
        postprocessor.postprocess_nodes(NodeWithScore(node=TextNode(text=DOC)), query_str="q?")

    chat = ChatDraftRAG(model=engine.target, draft=draft, budget=40, window_size=8, max_tokens=4)
    with pytest.raises(ValueError, match="prompt"):
        chat.invoke("")
    with pytest.raises(ValidationError, match="max_tokens"):
        ChatDraftRAG(model=engine.target, max_tokens=0)
    with pytest.raises(TypeError, match="unknown"):
        chat.invoke("hi", frequency_penalty=1.0)

    llm = DraftRAGLLM(target=engine.target, draft=draft, budget=40, window_size=8, max_new_tokens=4)
    with pytest.raises(TypeError, match="foo"):
        llm.complete("hi", foo=1)
    with pytest.raises(ValidationError, match="top_p"):
        DraftRAGLLM(target=engine.target, top_p=0.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, draft):
    path = tmp_path_factory.mktemp("bad-input-draft")
    draft.model.save_pretrained(path)
    draft.tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    ("case", "argv", "named"),
    [
        ("budget 0", ["compress", "--query", "q?", "--budget", "0"], "budget"),
        ("empty query", ["compress", "--query", " ", "--budget", "8"], "query"),
        ("missing file", ["compress", "--query", "q?", "--budget", "8", "/no/such/file.txt"], "no such file"),
        ("max-new-tokens 0", ["ask", "--query", "q?", "--max-new-tokens", "0", "--method", "full"],
         "max_new_tokens"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_cli_exits_2_with_the_reason(model_dir, tmp_path, capsys, case, argv, named):
    document = tmp_path / "doc.txt"
    document.write_text(DOC)
    models = ["--draft", model_dir] + (["--target", model_dir] if argv[0] == "ask" else [])
    files = [] if argv[0] == "ask" or "/no/such/file.txt" in argv else [str(document)]
    assert cli.main([*argv, *models, *files]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
