"""The SpecKV-PC cascade's prompt step: which text is compressed, and the draft answer reused from SpecPC."""

from __future__ import annotations

import copy

import pytest
import torch

from draft_rag import SpecPC
from draft_rag.cascade import compress_prompt, split_context
from draft_rag.kv.speckv import draft_answer
from draft_rag.specpc import _DraftPrompt
from tests.test_specpc import DOCS, QUERY, count
from tests.tiny import tiny_model

CONTEXT = "\n".join(DOCS)


@pytest.fixture(scope="module")
def draft():
    return tiny_model("qwen2", seed=7)


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
        ("ctx\n\nquestion?", ("ctx", "question?")),
        ("a\n\nb\n\n  q?  \n", ("a\n\nb", "q?")),
        ("no blank line here\nonly a newline", None),
        ("\n\nquestion only", None),
    ],
)
def test_split_context_at_the_last_blank_line(content, expected):
    assert split_context(content) == expected


def test_trailing_blank_lines_do_not_make_an_empty_question():
    assert split_context("context\n\nquestion?\n\n\n") == ("context", "question?")


def test_context_is_shortened_question_kept_and_other_messages_untouched(draft):
    prompt = messages(f"{CONTEXT}\n\n{QUERY}")
    before = copy.deepcopy(prompt)
    out = compress_prompt(prompt, make(draft), lookahead_tokens=0)
    assert prompt == before  # the caller's messages are not changed
    assert out.messages[0] == prompt[0]
    assert out.compression is not None
    assert out.compression.total_kept_tokens <= 40 < count(CONTEXT)
    shortened = out.messages[1]["content"]
    assert shortened == f"{out.compression.documents[0].text}\n\n{QUERY}"
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


@pytest.mark.parametrize("content", ["one paragraph, no question split", ""])
def test_no_blank_line_passes_through(draft, content):
    prompt = messages(content)
    out = compress_prompt(prompt, make(draft), lookahead_tokens=6)
    assert out.messages == prompt and out.compression is None and out.draft_answer is None


def test_no_user_message_passes_through(draft):
    prompt = [{"role": "system", "content": f"{CONTEXT}\n\n{QUERY}"}]
    assert compress_prompt(prompt, make(draft), 6).compression is None
