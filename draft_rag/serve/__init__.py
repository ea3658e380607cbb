"""``draft-rag serve``: an OpenAI-compatible gateway that compresses retrieved documents with SpecPC.

The gateway reads a chat completion request, finds its documents (a ``documents`` field, or
``<document>...</document>`` blocks inside message content), compresses them with :class:`~draft_rag.SpecPC`
against the last user message, and forwards the request to any OpenAI-compatible upstream (llama.cpp, vLLM,
TGI, a hosted API), streaming the answer back. In engine mode (``--target``) the server answers instead with
its own target model and SpecKV, batching the requests that arrive together.

One concern per module: :mod:`~draft_rag.serve.settings` (what the gateway is told),
:mod:`~draft_rag.serve.protocol` (what it reads of a request, and its error body),
:mod:`~draft_rag.serve.documents` (finding documents and writing the compressed text back; no torch),
:mod:`~draft_rag.serve.compression` (SpecPC off the event loop, behind a bounded queue),
:mod:`~draft_rag.serve.upstream` (the pooled HTTP client), :mod:`~draft_rag.serve.engine` (engine mode: the
scheduler that batches requests, and the answers), :mod:`~draft_rag.serve.streams` (streams that stop when their
client goes away), :mod:`~draft_rag.serve.metrics` (Prometheus) and
:mod:`~draft_rag.serve.app` (the routes, built by :func:`~draft_rag.serve.app.create_app`); apart from the
gateway, :mod:`~draft_rag.serve.launch` starts servers such as llama.cpp as child processes.
Needs ``pip install "draft-rag[serve]"``.
"""

from __future__ import annotations

from draft_rag.serve.settings import GatewaySettings

__all__ = ["GatewaySettings"]
