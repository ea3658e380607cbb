"""A local target model with SpecKV generation as a LangChain chat model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Literal, cast

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, HumanMessage, SystemMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, LLMResult
from langchain_core.runnables import RunnableConfig, get_config_list
from pydantic import ConfigDict, Field, PrivateAttr

from draft_rag.adapters import Lazy, SpecKVAdapter, call_options, chat_role, model_label, next_piece, usage
from draft_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET

if TYPE_CHECKING:
    from draft_rag import GenerationResult, SpecKV

# ChatMessage roles the chat template understands, under the names LangChain and OpenAI give them.
_ROLES = {
    "system": "system", "developer": "system", "user": "user", "human": "user", "assistant": "assistant",
    "ai": "assistant",
}
_CALL_OPTIONS = ("max_tokens", "temperature", "top_p", "seed")

# Answers of one batched engine call, by prompt, waiting for the per-prompt ``_generate`` calls that
# LangChain's ``generate`` makes (with callbacks and tracing) to pick them up.
_BATCHED: ContextVar[dict[str, list[GenerationResult]] | None] = ContextVar("draft_rag_batched", default=None)


class ChatDraftRAG(SpecKVAdapter, BaseChatModel):
    """A local target model whose KV cache is compressed by :class:`draft_rag.SpecKV` while it generates.

    ``method="speckv"`` lets a small draft model write an approximate answer first and keeps, per KV head,
    the ``budget`` prompt entries that the prompt tail and the draft answer attend to most; ``"snapkv"``
    (the target's own prompt tail), ``"streamingllm"`` (first tokens + recent window) and ``"full"`` (no
    eviction; the draft is not loaded) are the baselines. Messages are rendered with the target's chat
    template. Models load on first use, not at construction, and one instance may serve many threads and
    tasks: the model computes one step at a time, a paused stream holds nothing, so streams and calls may
    interleave (even ``invoke`` inside a ``stream`` loop), and the async methods run each step in a worker
    thread so the event loop keeps running. Settings changed after the first call (``budget``, ``method``,
    ``draft``, ``speckv_kwargs``...) apply from the next call on.

    Message content is text: a string, or a list of strings and ``{"type": "text"}`` blocks (joined as
    LangChain's ``message.text`` joins them). Image, audio and file blocks, tool messages, AI messages with
    tool calls and ``ChatMessage`` roles other than system, developer, user/human and assistant/ai raise
    ``ValueError``. Empty or whitespace-only messages are kept as empty turns; a prompt without any text
    raises ``ValueError``.

    Setup:
        .. code-block:: bash

            pip install "draft-rag[langchain,models]"

    Key init args:
        model: str | LoadedModel
            Target model (alias ``target``): packaged name, Hugging Face id, local path, or a loaded model.
        draft: str | LoadedModel
            Draft model of the same family (only ``method="speckv"`` uses it).
        method: "speckv" | "snapkv" | "streamingllm" | "full"
        budget: int
            KV entries per KV head per layer kept for the prompt.
        max_tokens, temperature, top_p, stop, seed:
            Generation settings; each may also be given per call.

    Instantiate:
        .. code-block:: python

            from langchain_draft_rag import ChatDraftRAG

            llm = ChatDraftRAG(method="speckv", budget=256, max_tokens=128)

    Invoke:
        .. code-block:: python

            msg = llm.invoke([("system", "Answer briefly."), ("human", "What is SpecKV?")])
            msg.content, msg.usage_metadata, msg.response_metadata["finish_reason"]

    Stream:
        .. code-block:: python

            for chunk in llm.stream("Write a haiku about caches."):
                print(chunk.content, end="", flush=True)

    Async:
        .. code-block:: python

            msg = await llm.ainvoke("What is SpecKV?")
            async for chunk in llm.astream("What is SpecKV?"):
                ...
    """

    model_config = ConfigDict(
        extra="forbid", arbitrary_types_allowed=True, validate_by_name=True, validate_by_alias=True
    )

    target: Any = Field(default=DEFAULT_TARGET, alias="model")
    """Target model: a packaged name, a Hugging Face id, a local path, or a ``draft_rag.models.LoadedModel``."""
    draft: Any = DEFAULT_DRAFT
    """Draft model for ``method="speckv"``, same tokenizer family as the target."""
    method: Literal["speckv", "snapkv", "streamingllm", "full"] = "speckv"
    """KV-cache method: ``"speckv"``, ``"snapkv"``, ``"streamingllm"`` or ``"full"`` (no eviction)."""
    budget: int = Field(default=256, gt=0)
    """KV entries per KV head per layer kept for the prompt."""
    prompt_budget: int | None = Field(default=None, gt=0)
    """The SpecKV-PC cascade: SpecPC first shortens the last user message's context (the text before its
    question, which comes last after a blank line) to this many tokens; ``None`` (default) keeps the whole
    prompt."""
    window_size: int = Field(default=32, gt=0)
    """Last prompt positions that always stay and whose queries score the others."""
    max_tokens: int = Field(default=256, gt=0)
    """Most new tokens per answer."""
    temperature: float = Field(default=0.0, ge=0.0)
    """Sampling temperature; 0 is greedy."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    stop: list[str] | None = None
    """Strings that end the answer (not included in it)."""
    seed: int | None = None
    """Random seed for sampling, for reproducible answers."""
    streaming: bool = False
    """Route ``invoke`` through streaming (callbacks see every token)."""
    speckv_kwargs: dict[str, Any] = Field(default_factory=dict)
    """More ``draft_rag.SpecKV`` settings, e.g. ``{"kernel_size": 7}``."""

    _engine: Lazy[SpecKV] = PrivateAttr(default_factory=Lazy)

    @property
    def _llm_type(self) -> str:
        return "draft-rag"

    @property
    def model_name(self) -> str:
        """The target's name (a loaded model reports the name it was loaded under)."""
        return model_label(self.target)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        # Everything that changes the answer: LangChain's LLM cache keys answers on these.
        return {
            "model_name": self.model_name,
            "draft": model_label(self.draft),
            "method": self.method,
            "budget": self.budget,
            "prompt_budget": self.prompt_budget,
            "window_size": self.window_size,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": self.stop,
            "seed": self.seed,
            "speckv_kwargs": dict(sorted(self.speckv_kwargs.items())),
        }

    def _get_invocation_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        # A call without stop strings uses the instance's: identify the call by the ones in effect.
        return super()._get_invocation_params(stop=stop if stop is not None else self.stop, **kwargs)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="draft_rag",
            ls_model_name=kwargs.get("model") or self.model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def _generation_kwargs(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``SpecKV.generate`` keyword arguments: the instance's settings overridden by per-call ones."""
        options = call_options(self, kwargs, _CALL_OPTIONS, also="stop")
        return {
            "max_new_tokens": options["max_tokens"],
            "temperature": options["temperature"],
            "top_p": options["top_p"],
            "seed": options["seed"],
            "stop": stop if stop is not None else self.stop,
        }

    def batch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """Answer ``inputs`` in one batched SpecKV generation (prompts decode together; see ``SpecKV.generate``).

        Callbacks and tracing see one run per input, as with ``invoke``. Falls back to LangChain's
        one-call-per-input batch when the inputs carry different configs, with ``return_exceptions``, and
        with ``streaming=True``.
        """
        shared = self._shared_config(inputs, config, return_exceptions)
        if shared is None:
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        prompts = [self._convert_input(item).to_messages() for item in inputs]
        result = self.generate(prompts, callbacks=shared.get("callbacks"), tags=shared.get("tags"),
                               metadata=shared.get("metadata"), run_name=shared.get("run_name"), **kwargs)
        return [cast("ChatGeneration", generations[0]).message for generations in result.generations]

    async def abatch(
        self,
        inputs: list[Any],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """The async :meth:`batch`: the batched generation runs in a worker thread."""
        shared = self._shared_config(inputs, config, return_exceptions)
        if shared is None:
            return await super().abatch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        prompts = [self._convert_input(item).to_messages() for item in inputs]
        result = await self.agenerate(prompts, callbacks=shared.get("callbacks"), tags=shared.get("tags"),
                                      metadata=shared.get("metadata"), run_name=shared.get("run_name"), **kwargs)
        return [cast("ChatGeneration", generations[0]).message for generations in result.generations]

    def generate(
        self, messages: list[list[BaseMessage]], stop: list[str] | None = None, callbacks: Any = None, **kwargs: Any
    ) -> LLMResult:
        """LangChain's ``generate``, with several prompts answered by one batched SpecKV generation."""
        with self._batched(messages, stop, kwargs, self._batch_results(messages, stop, kwargs)):
            return super().generate(messages, stop, callbacks, **kwargs)

    async def agenerate(
        self, messages: list[list[BaseMessage]], stop: list[str] | None = None, callbacks: Any = None, **kwargs: Any
    ) -> LLMResult:
        """The async :meth:`generate`: the batched generation runs in a worker thread."""
        results = await asyncio.to_thread(self._batch_results, messages, stop, kwargs)
        with self._batched(messages, stop, kwargs, results):
            return await super().agenerate(messages, stop, callbacks, **kwargs)

    def _shared_config(
        self, inputs: list[Any], config: RunnableConfig | list[RunnableConfig] | None, return_exceptions: bool
    ) -> RunnableConfig | None:
        """The one config that all ``inputs`` share, or None when batching them in one call is not possible."""
        if not inputs or return_exceptions or self.streaming:
            return None
        configs = get_config_list(config, len(inputs))
        if any(c != configs[0] for c in configs[1:]) or configs[0].get("run_id") is not None:
            return None
        return configs[0]

    def _batch_results(
        self, messages: list[list[BaseMessage]], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> list[GenerationResult] | None:
        """One batched engine call for several prompts (None for one prompt, a cache or streaming)."""
        cached = self.cache if self.cache is not None else get_llm_cache()
        if len(messages) < 2 or self.streaming or cached not in (None, False):
            return None  # cached answers skip _generate; a stream is per prompt
        options = {k: v for k, v in kwargs.items() if k not in ("tags", "metadata", "run_name", "run_id")}
        settings = self._generation_kwargs(stop, options)
        return self.engine.generate([to_chat_messages(m) for m in messages], **settings)

    @contextmanager
    def _batched(
        self,
        messages: list[list[BaseMessage]],
        stop: list[str] | None,
        kwargs: dict[str, Any],
        results: list[GenerationResult] | None,
    ) -> Iterator[None]:
        """Let the per-prompt ``_generate`` calls inside this block take their answers from ``results``."""
        if results is None:
            yield
            return
        waiting: dict[str, list[GenerationResult]] = {}
        for prompt, result in zip(messages, results, strict=True):
            waiting.setdefault(_prompt_key(prompt), []).append(result)
        token = _BATCHED.set(waiting)
        try:
            yield
        finally:
            _BATCHED.reset(token)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        batched = _BATCHED.get()
        waiting = batched.get(_prompt_key(messages)) if batched else None
        if waiting:
            result = waiting.pop(0)
        else:
            result = self.engine.generate(to_chat_messages(messages), **self._generation_kwargs(stop, kwargs))
        message = AIMessage(content=result.text, **self._metadata(result))
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await asyncio.to_thread(self._generate, messages, stop, None, **kwargs)

    def _pieces(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> Generator[str, None, GenerationResult]:
        return self.engine.stream(to_chat_messages(messages), **self._generation_kwargs(stop, kwargs))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        pieces = self._pieces(messages, stop, kwargs)
        while isinstance(piece := next_piece(pieces), str):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield self._last_chunk(piece)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # One worker thread per step, given back before the next step and never waiting on another worker,
        # so any number of concurrent streams and calls share a small thread pool; callbacks run on the loop.
        pieces = await asyncio.to_thread(self._pieces, messages, stop, kwargs)
        while isinstance(piece := await asyncio.to_thread(next_piece, pieces), str):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                await run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield self._last_chunk(piece)

    def _last_chunk(self, result: GenerationResult) -> ChatGenerationChunk:
        """The chunk that ends a stream: no text, the usage and the finish reason."""
        message = AIMessageChunk(content="", chunk_position="last", **self._metadata(result))
        return ChatGenerationChunk(message=message)

    def _metadata(self, result: GenerationResult) -> dict[str, Any]:
        """The usage and response metadata of the message that ends an answer: the usage report, LangChain's way."""
        report = usage(result)
        token_counts = UsageMetadata(
            input_tokens=report["prompt_tokens"],
            output_tokens=report["completion_tokens"],
            total_tokens=report["total_tokens"],
        )
        response = {
            "model_name": self.model_name,
            "finish_reason": report["finish_reason"],
            "method": self.method,
            "kv_entries_kept": report["kv_entries_kept"],
            "kv_entries_full": report["kv_entries_full"],
            "kv_bytes_kept": result.kv_bytes_kept,
            "kv_bytes_full": result.kv_bytes_full,
            "timings": report["timings"],
        }
        return {"usage_metadata": token_counts, "response_metadata": response}


def _prompt_key(messages: Sequence[BaseMessage]) -> str:
    """A prompt's identity for matching batched answers to LangChain's per-prompt calls.

    It is the prompt the engine is given (each message's chat-template role and text), so that two prompts
    share a key exactly when they get the same answer: a ``ChatMessage`` role counts, as every other part of a
    message that reaches the chat template does.
    """
    return json.dumps(to_chat_messages(messages))


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as ``{"role", "content"}`` dicts for the chat template, content as plain text."""
    return [{"role": message_role(i, m), "content": message_text(i, m)} for i, m in enumerate(messages)]


def message_role(index: int, message: BaseMessage) -> str:
    """The chat-template role of ``messages[index]``; a ValueError for tool calling and unknown roles."""
    if isinstance(message, AIMessage) and message.tool_calls:
        msg = f"messages[{index}] holds tool calls; ChatDraftRAG has no tool calling: pass text messages only."
        raise ValueError(msg)
    if isinstance(message, ChatMessage):
        problem = f"has the role {message.role!r}, which the chat template does not know"
        return chat_role(index, message.role, _ROLES, problem)
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    msg = (
        f"messages[{index}] is a {message.type!r} message; ChatDraftRAG has no tool calling: "
        "pass system, human, AI or ChatMessage messages."
    )
    raise ValueError(msg)


def message_text(index: int, message: BaseMessage) -> str:
    """The text of ``messages[index]``; a ValueError for image, audio, file or other non-text blocks."""
    if isinstance(message.content, str):
        return message.content
    for position, block in enumerate(message.content):
        if not (isinstance(block, str) or (
            isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)
        )):
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            msg = (
                f"messages[{index}].content[{position}] is a block of type {kind!r}; ChatDraftRAG reads text only: "
                "remove image, audio or file blocks, or pass them as {'type': 'text', 'text': ...}."
            )
            raise ValueError(msg)
    return str(message.text)
