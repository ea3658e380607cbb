"""SpecKV-PC: SpecPC shortens the prompt's context first, then SpecKV evicts the target's KV cache.

The cascade of the paper (arXiv 2506.08373): the draft model reads the whole prompt once. That pass gives
SpecPC its scores (the question window and the draft's answer tokens observe the context) and, because the
draft keeps generating for as many tokens as SpecKV's lookahead, it also gives SpecKV its draft answer:
the draft runs once per generation, over the long prompt, and never again over the shortened one.

Which text is "context": the last user message is split at its last blank line. What comes before it is
the context SpecPC shortens to ``prompt_budget`` target tokens; the paragraph after it is the question,
kept verbatim at the end of the message (put the question last, as the examples do). A last user message
without a blank line, system messages and earlier turns pass through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from draft_rag.specpc import CompressionResult, SpecPC

Message = dict[str, str]


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


def split_context(content: str) -> tuple[str, str] | None:
    """``(context, question)`` of a user message split at its last blank line, or None when there is none.

    The question is the text after the last blank line (stripped); both parts must hold some text.
    """
    head, sep, tail = content.rstrip().rpartition("\n\n")
    if not sep or not head.strip() or not tail.strip():
        return None
    return head, tail.strip()


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
    context, question = split
    if lookahead_tokens > 0:
        compressor = replace(compressor, lookahead_tokens=lookahead_tokens + 1)
    result = compressor.compress(question, [context])
    shortened = dict(messages[last], content=f"{result.documents[0].text}\n\n{question}")
    out = [*messages[:last], shortened, *messages[last + 1 :]]
    answer = result.lookahead_text if lookahead_tokens > 0 and result.lookahead_text else None
    return CascadedPrompt(out, answer, result)
