"""What the gateway reads of a chat completion request, and the OpenAI error body it answers with.

Only the fields the gateway acts on are typed: ``messages`` (their ``role`` and ``content``), ``stream``,
``documents`` and ``draft_rag``. Every other field, of the request and of each message, is kept as sent and
reaches the upstream untouched. Engine mode also reads the generation fields (:class:`GenerationFields`).
Validation errors name the field in ``param`` (``"messages[1].content"``, ``"documents[0]"``,
``"draft_rag.budget"``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from draft_rag.serve.documents import FieldDocument


class ErrorDetail(BaseModel):
    """The ``error`` object of an OpenAI error response."""

    message: str
    """What went wrong and how to fix it; never a traceback."""
    type: str
    """``invalid_request_error``, ``authentication_error``, ``upstream_error`` or ``server_error``."""
    param: str | None = None
    """The request field at fault, e.g. ``"draft_rag.budget"``."""
    code: str | None = None
    """A stable machine-readable reason, e.g. ``"invalid_json"``, ``"request_too_large"``."""


class ErrorResponse(BaseModel):
    """``{"error": {"message", "type", "param", "code"}}``, as OpenAI-compatible clients expect."""

    error: ErrorDetail


class GatewayError(Exception):
    """An error the gateway answers with an OpenAI error body and ``status``, plus any ``headers``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = headers or {}

    def body(self) -> bytes:
        """The JSON error body."""
        return ErrorResponse(error=self.detail).model_dump_json().encode()


def _check_content(value: Any) -> Any:
    """Message content: a string, null, or a list of parts whose ``text`` parts carry a string ``text``."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        msg = "must be a string, a list of content parts, or null"
        raise ValueError(msg)
    for index, part in enumerate(value):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            msg = f"part {index} must be an object with a string 'type'"
            raise ValueError(msg)
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            msg = f"part {index} is a text part without a string 'text'"
            raise ValueError(msg)
    return value


def _check_document(value: Any) -> FieldDocument:
    """A document of the ``documents`` field: a string, or an object with a string ``text`` and ``title``."""
    if isinstance(value, str):
        return FieldDocument(value)
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        title = value.get("title")
        if title is None or isinstance(title, str):
            return FieldDocument(value["text"], title)
    msg = "must be a string or an object with a string 'text' and an optional string 'title'"
    raise ValueError(msg)


def _positive_int(what: str) -> Callable[[Any], int | None]:
    """A check that a value is None or a positive integer; ``what`` says what it counts, in the error."""

    def check(value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            msg = f"must be a positive integer ({what}), got {json.dumps(value)}"
            raise ValueError(msg)
        return value

    return check


def _not_supported(value: Any) -> Any:
    """A field engine mode cannot honour: only its empty or neutral values (null, false, 0, [], {}) pass."""
    if value in (None, False, [], {}):
        return value
    msg = "is not supported in engine mode (the server's own target answers with plain text, one choice)"
    raise ValueError(msg)


def _check_stop(value: Any) -> Any:
    if value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    msg = f"must be a string or a list of strings, got {json.dumps(value)}"
    raise ValueError(msg)


def _one_choice(value: Any) -> Any:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
        return value
    msg = f"must be 1: engine mode answers with one choice per request, got {json.dumps(value)}"
    raise ValueError(msg)


def _text_format(value: Any) -> Any:
    if value is None or value == {"type": "text"}:
        return value
    msg = "must be {\"type\": \"text\"} in engine mode (structured output is not supported)"
    raise ValueError(msg)


class Message(BaseModel):
    """A chat message: its ``role`` and ``content``; other fields (``name``, ``tool_calls``...) are kept."""

    model_config = ConfigDict(extra="allow")
    role: StrictStr
    content: Annotated[Any, AfterValidator(_check_content)] = None


class DraftRAGOptions(BaseModel):
    """The request's ``draft_rag`` object: per-request SpecPC options."""

    model_config = ConfigDict(extra="forbid")
    budget: Annotated[Any, AfterValidator(_positive_int("tokens of document text to keep"))] = None
    """Tokens of document text to keep for this request (default: the gateway's ``--budget``)."""
    compress: StrictBool = True
    """False: the documents reach the upstream as they are."""
    kv_budget: Annotated[Any, AfterValidator(_positive_int("prompt KV entries to keep per KV head"))] = None
    """Engine mode: SpecKV's budget for this request (default: the server's ``--kv-budget``)."""
    lookahead_tokens: Annotated[Any, AfterValidator(_positive_int("tokens of the draft's answer"))] = None
    """Engine mode: the SpecKV draft answer's length for this request (default: the server's)."""


ENGINE_OPTIONS = ("kv_budget", "lookahead_tokens")
"""The ``draft_rag`` options that only engine mode reads."""


class ChatCompletionRequest(BaseModel):
    """The fields of ``POST /v1/chat/completions`` the gateway reads; the others are forwarded untouched."""

    model_config = ConfigDict(extra="allow")
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool | None = None
    documents: list[Annotated[Any, AfterValidator(_check_document)]] | None = None
    """Retrieved documents: strings, or ``{"text": ..., "title": ...}`` objects."""
    draft_rag: DraftRAGOptions | None = None


class StreamOptions(BaseModel):
    """The request's ``stream_options``."""

    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False
    """True: the stream ends with a chunk that carries ``usage`` (and no choices)."""


class GenerationFields(BaseModel):
    """The fields of a chat completion request that engine mode reads to generate, besides ``messages``.

    Values out of range are refused (400) rather than clamped; fields that would change the answer's form and
    that the engine cannot honour (tools, logprobs, structured output, several choices, penalties) are refused
    unless empty or neutral. Other fields (``model``, ``user``, ``metadata``...) are accepted and ignored.
    """

    model_config = ConfigDict(extra="allow")
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    """Most completion tokens; ``max_completion_tokens`` wins over ``max_tokens`` (default: the server's)."""
    temperature: Annotated[float, Field(ge=0, strict=True, allow_inf_nan=False)] | None = None
    """0 (the default here, unlike OpenAI's 1: answers are reproducible) is greedy."""
    top_p: Annotated[float, Field(gt=0, le=1, strict=True, allow_inf_nan=False)] | None = None
    stop: Annotated[Any, AfterValidator(_check_stop)] = None
    seed: Annotated[StrictInt, Field(ge=0, lt=2**64)] | None = None
    n: Annotated[Any, AfterValidator(_one_choice)] = None
    stream_options: StreamOptions | None = None
    response_format: Annotated[Any, AfterValidator(_text_format)] = None
    tools: Annotated[Any, AfterValidator(_not_supported)] = None
    functions: Annotated[Any, AfterValidator(_not_supported)] = None
    logprobs: Annotated[Any, AfterValidator(_not_supported)] = None
    top_logprobs: Annotated[Any, AfterValidator(_not_supported)] = None
    logit_bias: Annotated[Any, AfterValidator(_not_supported)] = None
    presence_penalty: Annotated[Any, AfterValidator(_not_supported)] = None
    frequency_penalty: Annotated[Any, AfterValidator(_not_supported)] = None


def parse_generation(data: dict[str, Any]) -> GenerationFields:
    """The generation fields of a request body already read by :func:`parse_request`.

    Raises:
        GatewayError: 400 naming the first field that is malformed or not supported.
    """
    try:
        return GenerationFields.model_validate(data)
    except ValidationError as error:
        raise _as_gateway_error(error) from None


def parse_request(body: bytes) -> tuple[dict[str, Any], ChatCompletionRequest]:
    """The request body as JSON (kept as sent, for forwarding) and its validated fields.

    Raises:
        GatewayError: 400 for a body that is not a JSON object or a field the gateway cannot read.
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        message = f"The request body is not valid JSON ({error})."
        raise GatewayError(400, message, code="invalid_json") from None
    if not isinstance(data, dict):
        raise GatewayError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as error:
        raise _as_gateway_error(error) from None
    return data, request


def _as_gateway_error(error: ValidationError) -> GatewayError:
    """The first validation error as a 400 that names the field."""
    first = error.errors(include_url=False, include_input=False)[0]
    param = _param(first["loc"])
    if first["type"] == "extra_forbidden":
        options = ", ".join(f"'{name}'" for name in DraftRAGOptions.model_fields)
        message = f"Unknown option '{param}'; the draft_rag options are {options}."
    elif first["type"] == "missing":
        message = f"'{param}' is required."
    elif first["type"] == "value_error":
        message = f"'{param}' {first['msg'].removeprefix('Value error, ')}."
    else:
        message = f"Invalid '{param}': {first['msg'][:1].lower()}{first['msg'][1:]}."
    return GatewayError(400, message, param=param, code="invalid_value")


def _param(loc: tuple[int | str, ...]) -> str:
    """A pydantic location as a field path: ``("messages", 1, "content")`` -> ``"messages[1].content"``."""
    path = ""
    for item in loc:
        path += f"[{item}]" if isinstance(item, int) else f".{item}" if path else str(item)
    return path
