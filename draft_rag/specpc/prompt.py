"""The draft prompt: documents and question laid into the draft's chat template, with each token's source span.

Also the checks of what goes into it (the query and documents, and the prompt's length against the draft's
context), and each document's draft cache chunk for :meth:`~draft_rag.specpc.SpecPC.warm`. torch and
transformers are imported where they are used, so that importing :mod:`draft_rag.specpc` does not load them.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from draft_rag.draft_cache import Chunk
    from draft_rag.models import LoadedModel

TEMPLATE_DATE = "26 Jul 2024"
"""The date a chat template that asks for ``date_string`` (Llama 3.x's "Today Date") shows the draft."""

# Each tokenizer's template parts, with the template they were rendered from. The parts are rendered once
# per tokenizer and process because a template may render the clock (Llama 3.x calls strftime_now when no
# date_string is given), and the prefix both lays out the draft prompt and keys the draft cache: rendered
# on every call, each day (or second) would bring new cache keys and other output. The store is per
# tokenizer, not per SpecPC, because the cascade makes a fresh SpecPC for every prompt (``replace``).
_TEMPLATE_PARTS: weakref.WeakKeyDictionary[Any, tuple[Any, str, str]] = weakref.WeakKeyDictionary()
_TEMPLATE_LOCK = threading.Lock()


class _DraftPrompt:
    """Token ids of [chat template prefix, documents, question, template suffix] with document offsets.

    Each document is tokenised on its own so that every one of its tokens maps to a character span of that
    document. Whitespace-only documents are left out of the prompt (``offsets`` is None for them).
    ``question_tokens`` counts what the prompt needs without any document: the template and the question.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, query: str, documents: Sequence[str]) -> None:
        prefix, suffix = _template_parts(tokenizer)
        self.documents = list(documents)
        prefix_ids = _encode(tokenizer, prefix)
        self.input_ids: list[int] = list(prefix_ids)
        self.starts: list[int] = []
        self.offsets: list[list[tuple[int, int]] | None] = []
        for doc in documents:
            if not doc.strip():
                self.offsets.append(None)
                continue
            encoded = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
            self.starts.append(len(self.input_ids))
            self.offsets.append([tuple(span) for span in encoded["offset_mapping"]])
            self.input_ids += encoded["input_ids"] + _encode(tokenizer, "\n\n")
        question_ids = _encode(tokenizer, f"Question: {query}{suffix}")
        self.question_tokens = len(prefix_ids) + len(question_ids)
        self.question_start = len(self.input_ids)
        self.input_ids += question_ids

    def context_positions(self) -> torch.Tensor:
        """Prompt positions of all document tokens, document after document."""
        import torch

        lengths = [len(o) for o in self.offsets if o is not None]
        return torch.cat([torch.arange(s, s + n) for s, n in zip(self.starts, lengths)])

    def context_segments(self) -> list[tuple[int, int]]:
        """Each non-blank document's ``(start, end)`` among the context positions, in order."""
        segments, start = [], 0
        for offsets in self.offsets:
            if offsets is not None:
                segments.append((start, start + len(offsets)))
                start += len(offsets)
        return segments

    def cache_chunks(self) -> tuple[list[int], list[Chunk]]:
        """The shared prefix's token ids and each non-blank document as a draft cache :class:`Chunk`.

        A chunk holds the document's tokens and the separator after it, so the prompt is the prefix, the
        chunks in order, then the question. Needs at least one non-blank document.
        """
        from draft_rag.draft_cache import Chunk

        ends = [*self.starts[1:], self.question_start]
        documents = [(doc, spans) for doc, spans in zip(self.documents, self.offsets) if spans is not None]
        chunks = [Chunk(doc, self.input_ids[start:end], spans)
                  for (doc, spans), start, end in zip(documents, self.starts, ends)]
        return self.input_ids[: self.starts[0]], chunks


def _template_parts(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """The chat template's text before and after a single user message (plain text without a template).

    Rendered once per tokenizer and template in a process (see ``_TEMPLATE_PARTS``), with ``date_string``
    pinned to :data:`TEMPLATE_DATE`: transformers hands a template no function of ours, so ``strftime_now``
    itself cannot be pinned, but Llama 3.x templates read ``date_string`` first, and with it their prefix,
    and so their draft cache entries on disk, stay the same in every process on every day.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return "", "\nAnswer:"
    with _TEMPLATE_LOCK:
        known = _TEMPLATE_PARTS.get(tokenizer)
        if known is not None and known[0] == template:
            return known[1], known[2]
        marker = "\u2063DRAFT_RAG_CONTENT\u2063"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True,
            date_string=TEMPLATE_DATE,
        )
        prefix, suffix = str(rendered).split(marker)
        _TEMPLATE_PARTS[tokenizer] = (template, prefix, suffix)
        return prefix, suffix


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(_encode(tokenizer, text))


def _cache_chunks(draft: LoadedModel, documents: Sequence[str]) -> Iterator[tuple[list[int], Chunk]]:
    """The shared prefix's token ids and the cache chunk of each non-blank document, tokenized one by one
    as they are asked for, each checked to fit the draft's context after the prefix."""
    for index, doc in enumerate(documents):
        if not doc.strip():
            continue
        prefix_ids, (chunk,) = _DraftPrompt(draft.tokenizer, "", [doc]).cache_chunks()
        needed = len(prefix_ids) + len(chunk.input_ids)
        if needed > draft.max_context:
            preview = doc.strip()[:40] + ("..." if len(doc.strip()) > 40 else "")
            msg = (
                f"documents[{index}] ({preview!r}) needs {needed} draft tokens after the chat template's "
                f"opening, more than the draft model's maximum context of {draft.max_context}; split it "
                "into smaller chunks."
            )
            raise ValueError(msg)
        yield prefix_ids, chunk


def _check_inputs(query: object, documents: object) -> None:
    from draft_rag.checks import check_text

    if not isinstance(query, str):
        msg = f"query must be a string, got {type(query).__name__}."
        raise TypeError(msg)
    if not query.strip():
        msg = "query is empty; SpecPC needs the question to decide what to keep."
        raise ValueError(msg)
    check_text("query", query)
    _check_documents(documents)


def _check_documents(documents: object) -> None:
    from draft_rag.checks import check_text

    if isinstance(documents, str) or not isinstance(documents, Sequence):
        msg = (
            f"documents must be a list of strings, got {type(documents).__name__}; "
            "wrap a single document as [text]."
        )
        raise TypeError(msg)
    for index, doc in enumerate(documents):
        if not isinstance(doc, str):
            msg = (
                f"documents[{index}] must be a string, got {type(doc).__name__}; "
                "pass the page text (e.g. Document.page_content)."
            )
            raise TypeError(msg)
        check_text(f"documents[{index}]", doc)


def _check_length(prompt: _DraftPrompt, draft: LoadedModel, lookahead_tokens: int) -> None:
    lookahead = max(lookahead_tokens - 1, 0)
    needed = len(prompt.input_ids) + lookahead
    if needed <= draft.max_context:
        return
    if prompt.question_tokens + lookahead > draft.max_context:
        msg = (
            f"query needs {prompt.question_tokens + lookahead} draft tokens with the chat template, more "
            f"than the draft model's maximum context of {draft.max_context} before any document. "
            "Shorten the question; long material belongs in documents."
        )
        raise ValueError(msg)
    longest = max(range(len(prompt.offsets)), key=lambda i: len(prompt.offsets[i] or []))
    msg = (
        f"documents need {needed} draft tokens with the question, more than the draft model's maximum "
        f"context of {draft.max_context} (the longest is documents[{longest}] with "
        f"{len(prompt.offsets[longest] or [])} tokens). Split long documents into smaller chunks or "
        "retrieve fewer of them."
    )
    raise ValueError(msg)
