"""The SpecKV-PC cascade's prompt step: which text is compressed, and the draft answer reused from SpecPC."""

from __future__ import annotations

import copy

import pytest
import torch

from draft_rag import SpecPC
from draft_rag.cascade import compress_prompt, split_context
from draft_rag.decoding import as_messages
from draft_rag.engine import SpecKV
from draft_rag.kv.speckv import draft_answer
from draft_rag.specpc.prompt import _DraftPrompt
from tests.test_specpc import DOCS, QUERY, count

CONTEXT = "\n".join(DOCS)
LONG = " ".join(["a paragraph of context"] * 10)  # longer than an instruction


def make(draft, budget=40):
    return SpecPC(draft=draft, budget=budget, window_size=8, kernel_size=5, neighbor_tokens=6, starting_layer_index=1)


def messages(content: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "Answer from the context.\n\nBe brief."},
        {"role": "user", "content": content},
    ]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("ctx\n\nquestion?", ("ctx", "\n\n", "question?")),
        ("a\n\nb\n\nq", ("a\n\nb", "\n\n", "q")),  # no question mark: the last paragraph
        # instructions after the question stay with it
        ("ctx\n\nWhat is X?\n\nAnswer in one word.", ("ctx", "\n\n", "What is X?\n\nAnswer in one word.")),
        ("ctx\n\nWhich one?\n\nA. red\nB. blue\n\nAnswer with the letter.",
         ("ctx", "\n\n", "Which one?\n\nA. red\nB. blue\n\nAnswer with the letter.")),
        ("Is it?\n\nctx\n\n**Question:** Who is it?**\n\nBe brief.",
         ("Is it?\n\nctx", "\n\n", "**Question:** Who is it?**\n\nBe brief.")),
        ("背景\n\n这是什么？\n\n请简短回答。", ("背景", "\n\n", "这是什么？\n\n请简短回答。")),
        # questions in the context do not count: only short instructions may follow the question
        (f"Why?\n\n{LONG}\n\nSummarize.", (f"Why?\n\n{LONG}", "\n\n", "Summarize.")),
        (f"ctx\n\nWhy?\n\n{LONG}", ("ctx\n\nWhy?", "\n\n", LONG)),
        # any blank line is a break: CRLF, whitespace-only lines, several of them
        ("ctx line\r\nmore\r\n\r\nq?", ("ctx line\r\nmore", "\r\n\r\n", "q?")),
        ("ctx  \n \t\n\n  q?", ("ctx", "  \n \t\n\n", "  q?")),
        # the question is kept verbatim: surrounding whitespace and trailing blank lines included
        ("a\n\nb\n\n  q?  \n", ("a\n\nb", "\n\n", "  q?  \n")),
        ("context\n\nquestion?\n\n\n", ("context", "\n\n", "question?\n\n\n")),
        # no context before the question: nothing to split
        ("no blank line here\nonly a newline", None),
        ("\n\nquestion only", None),
        ("What is X?\n\nAnswer in one word.", None),
        ("   \n\n\t\n\n", None),
    ],
)
def test_split_context(content, expected):
    split = split_context(content)
    assert split == expected
    assert split is None or "".join(split) == content


def test_context_is_shortened_question_kept_and_other_messages_untouched(draft):
    prompt = messages(f"{CONTEXT}\n\n{QUERY}")
    before = copy.deepcopy(prompt)
    out = compress_prompt(prompt, make(draft), lookahead_tokens=0)
    assert prompt == before  # the caller's messages are not changed
    assert out.messages[0] == prompt[0]
    assert out.compression is not None
    assert out.compression.total_kept_tokens <= 40 < count(CONTEXT)
    shortened = out.messages[1]["content"]
    # CONTEXT ends with a space: it belongs to the blank line, which is put back as it was written
    assert shortened == f"{out.compression.documents[0].text} \n\n{QUERY}"
    assert out.draft_answer is None  # no lookahead asked for


def test_draft_answer_is_the_drafts_greedy_answer_to_the_long_prompt(draft):
    steps = 6
    out = compress_prompt(messages(f"{CONTEXT}\n\n{QUERY}"), make(draft), lookahead_tokens=steps)
    ids = torch.tensor([_DraftPrompt(draft.tokenizer, QUERY, [CONTEXT]).input_ids])
    with draft.lock:
        expected = draft_answer(draft, ids, steps)
    assert out.draft_answer == (expected or None)
    assert out.draft_answer  # a random tiny model never emits its end of turn this early in practice


def test_context_within_budget_passes_through_without_the_draft(draft):
    prompt = messages(f"{DOCS[0]}\n\n{QUERY}")
    out = compress_prompt(prompt, make(draft, budget=count(DOCS[0]) + 5), lookahead_tokens=6)
    assert out.messages == prompt
    assert out.draft_answer is None
    assert out.compression is not None and not out.compression.documents[0].compressed


def test_question_with_instructions_is_kept_byte_for_byte_after_the_shortened_context(draft):
    question = f"  {QUERY}\r\n\r\nAnswer in one word.\r\n"
    out = compress_prompt(messages(f"{CONTEXT}\r\n \r\n{question}"), make(draft), lookahead_tokens=0)
    assert out.compression is not None and out.compression.documents[0].compressed
    assert out.compression.query == f"{QUERY}\r\n\r\nAnswer in one word."  # the draft reads the whole question
    assert out.messages[1]["content"] == f"{out.compression.documents[0].text} \r\n \r\n{question}"


@pytest.mark.parametrize("content", ["one paragraph, no question split", ""])
def test_no_blank_line_passes_through(draft, content):
    prompt = messages(content)
    out = compress_prompt(prompt, make(draft), lookahead_tokens=6)
    assert out.messages == prompt and out.compression is None and out.draft_answer is None


def test_no_user_message_passes_through(draft):
    prompt = [{"role": "system", "content": f"{CONTEXT}\n\n{QUERY}"}]
    assert compress_prompt(prompt, make(draft), 6).compression is None


# The engine with prompt_budget: SpecPC first, then eviction.

RAG_PROMPT = "\n\n".join(DOCS * 2) + "\n\n" + QUERY


def test_cascade_with_room_for_everything_equals_plain_generate(tiny_pair):
    from tests.test_speckv import plain_generate

    draft, target = tiny_pair
    engine = SpecKV(target=target, draft=draft, budget=4096, prompt_budget=4096)
    result = engine.generate(RAG_PROMPT, max_new_tokens=12)
    assert result.token_ids == plain_generate(target, RAG_PROMPT, 12)
    assert result.prompt_compression is not None and not result.prompt_compression.documents[0].compressed


def test_cascade_generates_from_the_shortened_prompt(tiny_pair):
    """SnapKV-PC (no draft answer) equals SnapKV over the messages that the cascade's SpecPC step makes."""
    draft, target = tiny_pair
    cascade = SpecKV(target=target, draft=draft, method="snapkv", budget=40, window_size=8, prompt_budget=60)
    result = cascade.generate(RAG_PROMPT, max_new_tokens=10)
    compression = result.prompt_compression
    assert compression is not None and compression.total_kept_tokens <= 60
    shortened = compress_prompt(as_messages(RAG_PROMPT), cascade.prompt_compressor, 0).messages
    plain = SpecKV(target=target, draft=draft, method="snapkv", budget=40, window_size=8)
    expected = plain.generate(shortened, max_new_tokens=10)
    assert result.token_ids == expected.token_ids
    assert result.prompt_tokens == expected.prompt_tokens < plain.generate(RAG_PROMPT, max_new_tokens=1).prompt_tokens
    assert result.kv_entries_kept == 40


def test_cascade_drafts_once_and_reuses_specpcs_answer(tiny_pair, monkeypatch):
    import draft_rag.kv.speckv

    def no_second_draft(*args, **kwargs):
        raise AssertionError("the draft answered again after SpecPC's pass")

    monkeypatch.setattr(draft_rag.kv.speckv, "draft_answer", no_second_draft)
    draft, target = tiny_pair
    engine = SpecKV(target=target, draft=draft, budget=30, window_size=8, prompt_budget=60, lookahead_tokens=5)
    result = engine.generate(RAG_PROMPT, max_new_tokens=6)
    assert result.kv_entries_kept == 30
    assert result.timings["compress_s"] > 0
    assert result.timings["draft_s"] < result.timings["compress_s"]


@pytest.mark.parametrize("value", [0, -3])
def test_prompt_budget_is_checked(tiny_pair, value):
    draft, target = tiny_pair
    with pytest.raises(ValueError, match="prompt_budget"):
        SpecKV(target=target, draft=draft, prompt_budget=value)


def test_cascade_loads_the_draft_for_methods_without_one(tiny_pair):
    draft, target = tiny_pair
    assert SpecKV(target=target, draft=draft, method="snapkv").draft is None
    assert SpecKV(target=target, draft=draft, method="snapkv", prompt_budget=64).draft is draft
