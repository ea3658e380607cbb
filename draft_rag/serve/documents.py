"""Find the documents of a chat request, its question, and write compressed documents back.

A request carries documents in two ways:

- a ``documents`` field: strings, or ``{"text": ..., "title": ...}`` objects (what
  ``client.chat.completions.create(..., extra_body={"documents": [...]})`` sends; Hugging Face chat templates
  use the same name). Most servers ignore fields they do not know, so these documents are written into the
  last user message, before its text, one block each (see :func:`field_documents_block`);
- ``<document>...</document>`` blocks inside message content, with any attributes (``<document id="3">``), in
  string content and in the ``text`` parts of list content, in any message. Their text is compressed in place.

The question is the text of the last user message with its document blocks taken out. Nothing outside the
documents' text changes: tags, attributes, the text around them, other messages and other fields stay as sent.
Pure Python, no torch: the request is a parsed JSON object.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DOCUMENT_BLOCK = re.compile(r"<document(?:\s[^<>]*)?>(.*?)</document\s*>", re.DOTALL)
"""A ``<document ...>...</document>`` block (lower-case tag, optional attributes); group 1 is its text."""

GATEWAY_FIELDS = ("documents", "draft_rag")
"""Request fields the gateway reads and removes before forwarding."""


@dataclass(frozen=True)
class FieldDocument:
    """A document of the request's ``documents`` field."""

    text: str
    title: str | None = None


@dataclass(frozen=True)
class TaggedDocument:
    """The text of a ``<document>`` block: in message ``message``, in its string content (``part`` None) or in
    its content part ``part``, at characters ``start:end`` of that string."""

    text: str
    message: int
    part: int | None
    start: int
    end: int


Document = FieldDocument | TaggedDocument


@dataclass(frozen=True)
class RequestDocuments:
    """The documents of a request, in the order the upstream's prompt holds them, and its question.

    ``question_message`` is the index of the last user message (None when there is none), which receives
    the field documents; ``question`` is its text with the document blocks taken out ("" when none).
    """

    documents: list[Document]
    question: str
    question_message: int | None

    @property
    def texts(self) -> list[str]:
        return [doc.text for doc in self.documents]


def find_documents(body: dict[str, Any], field_documents: Sequence[FieldDocument] = ()) -> RequestDocuments:
    """The documents of ``body`` (a chat request whose ``messages`` are valid) and its question.

    Field documents come in the prompt where they will be written: after the tagged documents of earlier
    messages, before those of the last user message.
    """
    messages = body["messages"]
    question_message = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"), None)
    tagged = [doc for index, message in enumerate(messages) for doc in _tagged(index, message.get("content"))]
    before = [doc for doc in tagged if question_message is None or doc.message < question_message]
    after = tagged[len(before):]
    question = "" if question_message is None else _question(messages[question_message].get("content"))
    return RequestDocuments([*before, *field_documents, *after], question, question_message)


def has_gateway_fields(body: dict[str, Any]) -> bool:
    """Whether ``body`` holds a field only the gateway reads (then it is rewritten before forwarding)."""
    return any(name in body for name in GATEWAY_FIELDS)


def rewrite(body: dict[str, Any], found: RequestDocuments, texts: Sequence[str]) -> dict[str, Any]:
    """``body`` with each document's text replaced by ``texts`` (same order as ``found.documents``), the field
    documents written into the last user message, and the gateway's own fields removed.

    Messages without documents, and every other field, are the very objects of ``body``; ``body`` itself is
    not modified.
    """
    if len(texts) != len(found.documents):
        msg = f"rewrite needs one text per document: {len(found.documents)} documents, {len(texts)} texts."
        raise ValueError(msg)
    messages = list(body["messages"])
    replacements: dict[tuple[int, int | None], list[tuple[TaggedDocument, str]]] = {}
    field_texts: list[tuple[FieldDocument, str]] = []
    for doc, text in zip(found.documents, texts):
        if isinstance(doc, TaggedDocument):
            replacements.setdefault((doc.message, doc.part), []).append((doc, text))
        else:
            field_texts.append((doc, text))
    for (index, part), spans in replacements.items():
        message = messages[index] = dict(messages[index])
        if part is None:
            message["content"] = _splice(message["content"], spans)
        else:
            parts = message["content"] = list(message["content"])
            parts[part] = {**parts[part], "text": _splice(parts[part]["text"], spans)}
    if field_texts:
        if found.question_message is None:
            msg = "field documents need a user message to be written into."
            raise ValueError(msg)
        message = messages[found.question_message] = dict(messages[found.question_message])
        block = field_documents_block(field_texts)
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = [{"type": "text", "text": block}, *content]
        else:
            message["content"] = block + (content or "")
    rewritten = {name: value for name, value in body.items() if name not in GATEWAY_FIELDS}
    rewritten["messages"] = messages
    return rewritten


def field_documents_block(documents: Sequence[tuple[FieldDocument, str]]) -> str:
    """How field documents appear at the start of the last user message: one block per document,
    ``<document index="1" title="...">``, the text on its own lines, ``</document>``, a blank line after each.

    The title is escaped as an attribute value; the text is written as it is.
    """
    blocks = []
    for index, (doc, text) in enumerate(documents, start=1):
        title = "" if doc.title is None else f' title="{html.escape(doc.title, quote=True)}"'
        blocks.append(f'<document index="{index}"{title}>\n{text}\n</document>\n\n')
    return "".join(blocks)


def _tagged(message: int, content: Any) -> list[TaggedDocument]:
    """The document blocks of one message's content, in order."""
    if isinstance(content, str):
        return _blocks(content, message, None)
    if isinstance(content, list):
        return [doc for index, part in enumerate(content) if part.get("type") == "text"
                for doc in _blocks(part["text"], message, index)]
    return []


def _blocks(text: str, message: int, part: int | None) -> list[TaggedDocument]:
    return [TaggedDocument(m.group(1), message, part, m.start(1), m.end(1)) for m in DOCUMENT_BLOCK.finditer(text)]


def _question(content: Any) -> str:
    """The text of a message's content without its document blocks, blank runs folded to one blank line."""
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = "\n".join(part["text"] for part in content if part.get("type") == "text")
    else:
        text = ""
    return re.sub(r"\s*\n\s*\n\s*", "\n\n", DOCUMENT_BLOCK.sub("", text)).strip()


def _splice(text: str, spans: list[tuple[TaggedDocument, str]]) -> str:
    """``text`` with each document's ``start:end`` replaced by its new text (spans do not overlap)."""
    pieces = []
    cursor = 0
    for doc, new in sorted(spans, key=lambda item: item[0].start):
        pieces += [text[cursor:doc.start], new]
        cursor = doc.end
    pieces.append(text[cursor:])
    return "".join(pieces)
