"""SpecKV-PC: SpecPC shortens the prompt's context first, then SpecKV evicts the target's KV cache.

The cascade of the paper (arXiv 2506.08373): the draft model reads the whole prompt once. That pass gives
SpecPC its scores (the question window and the draft's answer tokens observe the context) and, because the
draft keeps generating for as many tokens as SpecKV's lookahead, it also gives SpecKV its draft answer:
the draft runs once per generation, over the long prompt, and never again over the shortened one.

Which text is "context": the last user message ends with the question (put it last, as the examples do),
found by :func:`split_context`; what comes before it is the context SpecPC shortens to ``prompt_budget``
target tokens, and the question is kept byte for byte after the blank line that precedes it. A last user
message with no context before its question, system messages and earlier turns pass through unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from draft_rag.specpc import CompressionResult, SpecPC

Message = dict[str, str]

INSTRUCTION_CHARS = 200
"""Longest paragraph (stripped) that may follow the question as an instruction, e.g. "Answer in one word."."""

# A blank line: a line end followed by one or more lines of only whitespace ("\n\n", "\r\n\r\n", "\n \t\n").
_PARAGRAPH_BREAK = re.compile(r"[^\S\n]*\n(?:[^\S\n]*\n)+")
# A question mark (ASCII, full-width or Arabic) at the end, perhaps inside closing quotes, brackets or emphasis.
_QUESTION_END = re.compile(r"[?\uff1f\u061f][\"'\u201d\u2019\u00bb)\]*_`]*\s*\Z")


@dataclass(frozen=True)
class CascadedPrompt:
    """A prompt after SpecPC: the messages to generate from and what the draft produced on the way.

    Attributes:
        messages: the prompt with the last user message's context shortened (a new list; the input is
            never changed).
        draft_answer: the draft's greedy answer from SpecPC's pass, up to ``lookahead_tokens`` tokens and its
            end of turn; ``None`` when the draft did not run (nothing to compress) or said nothing.
        compression: SpecPC's result for the context, or ``None`` when the prompt had no context to shorten.
    """

    messages: list[Message]
    draft_answer: str | None
    compression: CompressionResult | None


def split_context(content: str) -> tuple[str, str, str] | None:
    """``(context, separator, question)`` of a user message, or None when it has no context before its question.

    Paragraphs are separated by blank lines: a line end followed by lines of only whitespace (CRLF line ends
    too). The question is the last paragraph, or, when only short instructions (paragraphs of at most
    :data:`INSTRUCTION_CHARS` characters, such as "Answer in one word.") follow a paragraph that ends with a
    question mark, everything from that paragraph on. The three parts are slices of ``content`` that join to
    it: nothing is stripped, so the question and the blank line before it can be put back byte for byte.
    The context must hold some text.
    """
    breaks = list(_PARAGRAPH_BREAK.finditer(content))
    starts = [0] + [b.end() for b in breaks]
    paragraphs = [content[start : b.start()] for start, b in zip(starts, breaks)] + [content[starts[-1] :]]
    last = max((i for i, text in enumerate(paragraphs) if text.strip()), default=0)
    first = last
    for i in range(last, -1, -1):
        if _QUESTION_END.search(paragraphs[i]):
            first = i
            break
        if len(paragraphs[i].strip()) > INSTRUCTION_CHARS:
            break
    if first == 0 or not content[: breaks[first - 1].start()].strip():
        return None
    separator = breaks[first - 1]
    return content[: separator.start()], separator.group(), content[separator.end() :]


def compress_prompt(messages: list[Message], compressor: SpecPC, lookahead_tokens: int) -> CascadedPrompt:
    """Shorten the last user message's context with ``compressor``; the draft also answers for SpecKV.

    Args:
        messages: validated ``{"role", "content"}`` messages (see :func:`~draft_rag.decoding.as_messages`).
        compressor: the SpecPC whose ``budget`` is the prompt budget (counted in the target's tokens).
        lookahead_tokens: how many answer tokens the draft generates after the prompt (0: SpecPC's own
            setting and no draft answer is wanted). Their queries observe for SpecPC too.
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    split = None if last is None else split_context(messages[last]["content"])
    if last is None or split is None:
        return CascadedPrompt(list(messages), None, None)
    context, separator, question = split
    if lookahead_tokens > 0:
        compressor = replace(compressor, lookahead_tokens=lookahead_tokens + 1)
    result = compressor.compress(question.strip(), [context])
    shortened = dict(messages[last], content=result.documents[0].text + separator + question)
    out = [*messages[:last], shortened, *messages[last + 1 :]]
    answer = result.lookahead_text if lookahead_tokens > 0 and result.lookahead_text else None
    return CascadedPrompt(out, answer, result)
