"""A local target model with SpecKV generation as a LlamaIndex LLM."""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from llama_index.core.base.llms.generic_utils import (
    astream_completion_response_to_chat_response,
    completion_response_to_chat_response,
    stream_completion_response_to_chat_response,
)
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr, model_validator
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from pydantic import AliasChoices

from draft_rag.adapters import (
    Lazy,
    SpecKVAdapter,
    call_options,
    chat_role,
    check_keywords,
    check_picklable,
    model_label,
    next_piece,
    usage,
)
from draft_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET

if TYPE_CHECKING:
    from draft_rag import GenerationResult, SpecKV

Prompt = str | list[dict[str, str]]
# The roles the chat template understands, under the names LlamaIndex gives them for different providers.
_ROLES = {
    MessageRole.SYSTEM: "system", MessageRole.DEVELOPER: "system", MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant", MessageRole.CHATBOT: "assistant", MessageRole.MODEL: "assistant",
}
_CALL_OPTIONS = ("max_new_tokens", "temperature", "top_p", "seed", "stop")


class DraftRAGLLM(SpecKVAdapter, CustomLLM):
    """A local target model whose KV cache is compressed by :class:`draft_rag.SpecKV` while it generates.

    ``method="speckv"`` lets a small draft model write an approximate answer first and keeps, per KV head,
    the ``budget`` prompt entries that the prompt tail and the draft answer attend to most; ``"snapkv"``,
    ``"streamingllm"`` and ``"full"`` (no eviction; the draft is not loaded) are the baselines. Chat
    messages are rendered with the target's chat template; a completion prompt becomes one user message.

    Models load on first use, not at construction. One instance may serve many threads and tasks: the model
    computes one step at a time and a paused stream holds nothing, so streams and calls may interleave, and
    the async methods run each step in a worker thread so the event loop keeps running while tokens are
    produced. Settings changed after the first call (``budget``, ``method``, ``draft``, ``speckv_kwargs``...)
    apply from the next call on.

    At construction ``model`` is another name of ``target``, ``max_tokens`` and ``num_output`` of
    ``max_new_tokens`` (the names other LlamaIndex LLMs use); any other unknown keyword raises ``TypeError``
    naming it and the closest setting, rather than leaving a default in place.

    Per call, ``complete``/``chat`` and their stream and async forms accept ``max_new_tokens`` (alias
    ``max_tokens``), ``temperature``, ``top_p``, ``seed`` and ``stop``; any other keyword raises
    ``TypeError`` rather than being ignored (``complete`` also takes LlamaIndex's ``formatted``).

    Message content is text: ``TextBlock`` blocks, joined as LlamaIndex's ``message.content`` joins them;
    image, audio, document, tool-call and other blocks, tool and function messages raise ``ValueError``.
    ``developer`` reads as ``system``, ``chatbot`` and ``model`` as ``assistant``. Messages with no content
    (``None``) or whitespace only are kept as empty turns; a prompt without any text raises ``ValueError``.

    Example:
        .. code-block:: python

            from llama_index.llms.draft_rag import DraftRAGLLM

            llm = DraftRAGLLM(method="speckv", budget=256, max_new_tokens=128)
            print(llm.complete("What is SpecKV?").text)
            query_engine = index.as_query_engine(llm=llm)
    """

    target: Any = Field(
        default=DEFAULT_TARGET,
        validation_alias=AliasChoices("target", "model"),
        description="Target model (alias model): a packaged name, a Hugging Face id, a local path, or a LoadedModel.",
    )
    draft: Any = Field(default=DEFAULT_DRAFT, description="Draft model for method='speckv'.")
    method: Literal["speckv", "snapkv", "streamingllm", "full"] = Field(
        default="speckv", description="KV-cache method: speckv, snapkv, streamingllm or full (no eviction)."
    )
    budget: int = Field(default=256, gt=0, description="KV entries per KV head per layer kept for the prompt.")
    prompt_budget: int | None = Field(
        default=None, gt=0,
        description="SpecKV-PC cascade: SpecPC first shortens the last user message's context (the text before "
        "its question, which comes last after a blank line) to this many tokens; None keeps the whole prompt.",
    )
    window_size: int = Field(default=32, gt=0, description="Last prompt positions that always stay.")
    max_new_tokens: int = Field(
        default=256, gt=0, validation_alias=AliasChoices("max_new_tokens", "max_tokens", "num_output"),
        description="Most new tokens per answer (aliases max_tokens, num_output).",
    )
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: list[str] | None = Field(default=None, description="Strings that end the answer.")
    seed: int | None = Field(default=None, description="Random seed for sampling.")
    context_window: int | None = Field(
        default=None, gt=0,
        description="The target's context length in tokens; None reads it from the target's config (this loads "
        "the models on first use of metadata).",
    )
    speckv_kwargs: dict[str, Any] = Field(default_factory=dict, description="More draft_rag.SpecKV settings.")

    _engine: Lazy[SpecKV] = PrivateAttr(default_factory=Lazy)

    @classmethod
    def class_name(cls) -> str:
        return "DraftRAGLLM"

    @model_validator(mode="before")
    @classmethod
    def _check_keywords(cls, data: Any) -> Any:
        # LlamaIndex's to_dict() and to_json() add the class name to the settings.
        check_keywords(cls.__name__, data, cls.model_fields, ignored=("class_name",))
        return data

    def __getstate__(self) -> dict[str, Any]:
        check_picklable(self, "target", "draft")
        return super().__getstate__()

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window or self.engine.target.max_context,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            model_name=model_label(self.target),
        )

    def _generation_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``SpecKV.generate`` keyword arguments: the instance's settings overridden by per-call ones."""
        return call_options(
            self, kwargs, _CALL_OPTIONS, also="max_tokens (an alias of max_new_tokens)",
            aliases={"max_tokens": "max_new_tokens"},
        )

    def _generate(self, prompt: Prompt, kwargs: dict[str, Any]) -> CompletionResponse:
        result = self.engine.generate(prompt, **self._generation_kwargs(kwargs))
        return CompletionResponse(text=result.text, raw=result, additional_kwargs=usage(result))

    def _pieces(self, prompt: Prompt, kwargs: dict[str, Any]) -> Generator[str, None, GenerationResult]:
        return self.engine.stream(prompt, **self._generation_kwargs(kwargs))

    async def _apieces(self, prompt: Prompt, kwargs: dict[str, Any]) -> Generator[str, None, GenerationResult]:
        # Building the engine loads the models: do it in a worker thread too.
        return await asyncio.to_thread(self._pieces, prompt, kwargs)

    def _completion_prompt(self, prompt: str, formatted: bool) -> str:
        if formatted or self.completion_to_prompt is None:
            return prompt
        return self.completion_to_prompt(prompt)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._generate(self._completion_prompt(prompt, formatted), kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return responses(self._pieces(self._completion_prompt(prompt, formatted), kwargs))

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return completion_response_to_chat_response(self._generate(to_chat_messages(messages), kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        pieces = self._pieces(to_chat_messages(messages), kwargs)
        return stream_completion_response_to_chat_response(responses(pieces))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self._generate, self._completion_prompt(prompt, formatted), kwargs)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        return aresponses(await self._apieces(self._completion_prompt(prompt, formatted), kwargs))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        response = await asyncio.to_thread(self._generate, to_chat_messages(messages), kwargs)
        return completion_response_to_chat_response(response)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        pieces = await self._apieces(to_chat_messages(messages), kwargs)
        return astream_completion_response_to_chat_response(aresponses(pieces))


def responses(pieces: Generator[str, None, GenerationResult]) -> CompletionResponseGen:
    """Streamed pieces as responses with the text so far and the new piece; the last one carries the usage."""
    text = ""
    while isinstance(item := next_piece(pieces), str):
        text += item
        yield CompletionResponse(text=text, delta=item)
    yield CompletionResponse(text=text, delta="", raw=item, additional_kwargs=usage(item))


async def aresponses(pieces: Generator[str, None, GenerationResult]) -> CompletionResponseAsyncGen:
    """The async form of :func:`responses`: every step of generation runs in a worker thread.

    A step gives its thread back before the next one and never waits on work that needs another thread, so
    any number of concurrent streams and calls share a small thread pool.
    """
    text = ""
    while isinstance(item := await asyncio.to_thread(next_piece, pieces), str):
        text += item
        yield CompletionResponse(text=text, delta=item)
    yield CompletionResponse(text=text, delta="", raw=item, additional_kwargs=usage(item))


def to_chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """LlamaIndex chat messages as ``{"role", "content"}`` dicts for the chat template, content as plain text."""
    converted = []
    for index, message in enumerate(messages):
        problem = f"is a {message.role.value!r} message; DraftRAGLLM has no tool calling"
        role = chat_role(index, message.role, _ROLES, problem)
        if message.additional_kwargs.get("tool_calls"):
            msg = f"messages[{index}] holds tool calls; DraftRAGLLM has no tool calling: pass text messages only."
            raise ValueError(msg)
        for position, block in enumerate(message.blocks):
            if not isinstance(block, TextBlock):
                msg = (
                    f"messages[{index}].blocks[{position}] is a block of type {type(block).__name__}; DraftRAGLLM "
                    "reads text only: remove image, audio and document blocks, or pass text as TextBlock(text=...)."
                )
                raise ValueError(msg)
        converted.append({"role": role, "content": message.content or ""})
    return converted
