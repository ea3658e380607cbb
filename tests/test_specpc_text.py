"""SpecPC on awkward text: scripts without spaces, long unbroken tokens, whitespace, bad code points."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from draft_rag.specpc import CompressedDocument
from draft_rag.specpc.selection import fit_to_budget
from draft_rag.specpc.text import ELISION_MARKER, join_spans, snap_spans
from tests.test_specpc import count, make
from tests.tiny import tiny_model

QUERY = "What is the special magic number?"
ENGLISH = "The quick brown fox jumps over the lazy dog. A special magic number is hidden in the text. " * 3
CHINESE = "检索增强生成会读取很长的文档，草稿模型决定保留哪些词元。特别的魔法数字是四八一五一六二。" * 4
JAPANESE = ("検索拡張生成は長い文書を読み、小さな下書きモデルが"
            "どのトークンを残すかを決めます。魔法の数字は四八一五です。") * 3
THAI = "การค้นคืนเอกสารยาวมากและแบบจำลองขนาดเล็กเลือกข้อความที่สำคัญที่สุดเลขพิเศษคือสี่แปดหนึ่งห้า" * 3
URL = "https://example.com/download?token=" + "a1b2c3d4e5f6" * 40 + "&page=2"
BASE64 = "QSBzcGVjaWFsIG1hZ2ljIG51bWJlciBpcyBoaWRkZW4gaW4gdGhlIHRleHQu" * 12

UNSPACED = {"chinese": CHINESE, "japanese": JAPANESE, "thai": THAI, "url": URL, "base64": BASE64}


def check_spans(result, documents):
    """Counts match the texts, spans lie inside their source in order, and the text is made of them."""
    assert sum(count(d.text) for d in result.documents) == result.total_kept_tokens <= result.budget
    for source, doc in zip(documents, result.documents, strict=True):
        assert all(0 <= s < e <= len(source) for s, e in doc.spans)
        assert all(a[1] < b[0] for a, b in zip(doc.spans, doc.spans[1:]))
        at = 0
        for s, e in doc.spans:
            at = doc.text.index(source[s:e], at) + (e - s)


@pytest.mark.parametrize("name", list(UNSPACED))
@pytest.mark.parametrize("budget", [64, 128])
def test_text_without_spaces_is_compressed_not_emptied(draft, name, budget):
    documents = [UNSPACED[name], ENGLISH]
    result = make(draft, budget=budget).compress(QUERY, documents)
    check_spans(result, documents)
    assert result.total_kept_tokens >= budget // 2  # the budget is used, not shrunk to nothing
    unspaced = result.documents[0]
    assert not unspaced.dropped and unspaced.text.strip("… ")


@pytest.mark.parametrize("name", list(UNSPACED))
def test_text_without_spaces_alone(draft, name):
    documents = [UNSPACED[name]]
    result = make(draft, budget=48).compress(QUERY, documents)
    check_spans(result, documents)
    assert 24 <= result.total_kept_tokens <= 48


@pytest.mark.parametrize("name", list(UNSPACED))
def test_nearly_everything_fits_so_nothing_is_dropped(draft, name):
    documents = [UNSPACED[name], ENGLISH, CHINESE]
    budget = sum(count(d) for d in documents) - 10
    result = make(draft, budget=budget).compress(QUERY, documents)
    check_spans(result, documents)
    assert result.total_kept_tokens >= budget - 40
    assert not any(d.dropped for d in result.documents)


def test_snapping_stops_at_scripts_without_spaces_and_far_word_edges():
    assert snap_spans(CHINESE, [(5, 6), (6, 8)]) == [(5, 8)]  # token boundaries, merged
    assert snap_spans(URL, [(100, 104)]) == [(100, 104)]  # no whitespace within reach
    assert snap_spans("see " + URL, [(5, 8)]) == [(4, 8)]  # the word edge is near on the left only
    assert snap_spans("abc中文def ghi", [(1, 2), (6, 7)]) == [(0, 3), (5, 8)]  # Latin words end at Chinese
    assert snap_spans("alpha beta", [(7, 8)], reach=0) == [(7, 8)]
    assert snap_spans("alpha beta", [(7, 8)], reach=1) == [(6, 8)]  # "b" is 1 away, "ta" 2
    assert snap_spans("alpha beta", [(7, 8)], reach=2) == [(6, 10)]
    assert snap_spans("ที่นี่", [(0, 1)]) == [(0, 3)]  # combining marks stay with their base letter


def _snap_each_token(source, token_spans, reach=16):
    """The plain rule, character by character: every token widened to its word edges within ``reach`` covers its
    characters; the covered characters that are not whitespace, joined wherever only whitespace lies between."""
    from draft_rag.specpc.text import _word_end, _word_start

    covered = set()
    for token_start, token_end in token_spans:
        covered.update(range(_word_start(source, token_start, reach), _word_end(source, token_end, reach)))
    spans = []
    for at in sorted(i for i in covered if not source[i].isspace()):
        if spans and not source[spans[-1][1] : at].strip():
            spans[-1] = (spans[-1][0], at + 1)
        else:
            spans.append((at, at + 1))
    return spans


def test_snapping_runs_of_tokens_equals_snapping_each_token():
    """snap_spans snaps each run of touching tokens once; the spans are those of snapping every token."""
    import random

    rng = random.Random(3)
    pieces = ["alpha", "beta", "internationalization", "x", " ", "  ", "\n", "\t", "中文", "ที่", "é", "e\u0301",
              "https://example.com/" + "ab" * 12, ".", ",", "四八一五"]
    for _ in range(1000):
        source = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        cuts = sorted({0, len(source), *rng.sample(range(len(source) + 1), min(len(source), rng.randint(0, 25)))})
        tokens = list(zip(cuts, cuts[1:]))
        kept = [t for t in tokens if rng.random() < 0.5]
        kept += [(s, s) for s in rng.sample(cuts, min(2, len(cuts)))] if rng.random() < 0.1 else []
        for reach in (0, 2, 16):
            assert snap_spans(source, kept, reach) == _snap_each_token(source, kept, reach), (source, kept, reach)


def test_snapping_and_joining_run_without_torch():
    """The text step is pure Python: it imports and gives the same spans and text with torch unavailable."""
    cases = [(ENGLISH, [(5, 7), (40, 42), (90, 91)]), (CHINESE, [(5, 6), (6, 8), (30, 33)]), ("ที่นี่ abc", [(0, 1)]),
             ("see " + URL, [(5, 8)])]
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
from draft_rag.specpc.text import ELISION_MARKER, join_spans, snap_spans
out = []
for source, token_spans in {cases!r}:
    spans = snap_spans(source, token_spans)
    out.append((spans, join_spans(source, spans, ELISION_MARKER)))
assert "torch" not in [name.split(".")[0] for name, module in sys.modules.items() if module is not None]
print(repr(out))
"""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, cwd=root)
    assert run.returncode == 0, run.stderr
    expected = [(spans, join_spans(source, spans, ELISION_MARKER))
                for source, token_spans in cases for spans in [snap_spans(source, token_spans)]]
    assert run.stdout.strip() == repr(expected)


def test_whitespace_documents_take_no_budget(draft):
    documents = [" " * 300, ENGLISH, "\n\t " * 40]
    result = make(draft, budget=10).compress(QUERY, documents)
    check_spans(result, documents)
    blank, english, tabs = result.documents
    for doc, source in ((blank, documents[0]), (tabs, documents[2])):
        assert (doc.text, doc.spans, doc.kept_tokens, doc.blank) == ("", [], 0, True)
        assert doc.original_tokens == count(source) > 0 and not doc.dropped
    assert english.text.strip("… ") and not english.dropped
    assert 5 <= result.total_kept_tokens <= 10


def test_only_whitespace_over_the_budget(draft):
    documents = [" " * 300, "\n" * 50, ""]
    result = make(draft, budget=10).compress(QUERY, documents)
    assert result.texts == ["", "", ""]
    assert result.total_kept_tokens == 0 and not any(d.dropped for d in result.documents)
    assert [d.original_tokens for d in result.documents] == [count(d) for d in documents]


def test_whitespace_documents_that_fit_come_back_unchanged(draft):
    documents = ["   ", "A special magic number."]
    result = make(draft, budget=100).compress(QUERY, documents)
    assert result.texts == documents and not any(d.dropped for d in result.documents)


@pytest.mark.parametrize(
    ("query", "documents", "name"),
    [
        (QUERY, [ENGLISH, "abc\ud800def"], r"documents\[1\]"),
        ("What is \udcff the number?", [ENGLISH], "query"),
    ],
)
def test_lone_surrogates_are_named(draft, query, documents, name):
    with pytest.raises(ValueError, match=rf"^{name} holds a lone surrogate.*encode\('utf-8', 'replace'\)"):
        make(draft, budget=64).compress(query, documents)


def test_nul_characters_pass_through(draft):
    documents = ["The magic\x00number is 4815162.\x00 " * 12, "nul\x00"]
    result = make(draft, budget=40).compress(QUERY, documents)
    check_spans(result, documents)
    assert result.total_kept_tokens >= 20
    assert make(draft, budget=10_000).compress(QUERY, documents).texts == documents


def test_a_query_too_long_for_the_draft_is_blamed_on_the_query():
    draft = tiny_model("qwen2", seed=7, max_position_embeddings=64)
    documents = ["short text here.", "The quick brown fox jumps. " * 3]
    with pytest.raises(ValueError, match=r"^query needs \d+ draft tokens") as error:
        make(draft, budget=10).compress("What is the magic number? " * 20, documents)
    assert "documents[" not in str(error.value)


def _fake_build(tokens_for):
    """A ``build`` for fit_to_budget whose n-token selection counts ``tokens_for(n)`` tokens."""
    calls = []

    def build(n):
        calls.append(n)
        return [CompressedDocument("x" * n, [(0, n)] if n else [], tokens_for(n), 1000)]

    return build, calls


@pytest.mark.parametrize(
    ("tokens_for", "largest"),
    [
        (lambda n: n, 64),  # fits at once
        (lambda n: n + 5 if n else 0, 59),  # a marker's worth of overhead
        (lambda n: n if n <= 40 else n + 30, 40),  # a jump: shrinking in proportion would stop short
        (lambda n: 2 * n, 32),
        (lambda n: 100 if n else 0, 0),  # nothing fits but the empty selection
    ],
)
def test_fit_to_budget_keeps_the_largest_selection_that_fits(tokens_for, largest):
    build, calls = _fake_build(tokens_for)
    documents = fit_to_budget(build, 64)
    assert documents[0].text == "x" * largest
    assert calls[0] == 64 and len(calls) <= 9


def test_fit_to_budget_needs_few_rebuilds_when_the_overhead_is_steady():
    build, calls = _fake_build(lambda n: n + 5 if n else 0)
    assert fit_to_budget(build, 512)[0].text == "x" * 507
    assert len(calls) <= 4, calls
    build, calls = _fake_build(lambda n: n + n // 10)  # overhead in proportion: markers between many spans
    largest = max(n for n in range(1025) if n + n // 10 <= 1024)
    assert fit_to_budget(build, 1024)[0].text == "x" * largest
    assert len(calls) <= 5, calls
