"""What the gateway reads of a chat completion request, and the OpenAI error body it answers with.

Only the fields the gateway acts on are typed: ``messages`` (their ``role`` and ``content``), ``stream``,
``documents`` and ``draft_rag``. Every other field, of the request and of each message, is kept as sent and
reaches the upstream untouched. Validation errors name the field in ``param`` (``"messages[1].content"``,
``"documents[0]"``, ``"draft_rag.budget"``).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

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


def _check_budget(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"must be a positive integer (tokens of document text to keep), got {json.dumps(value)}"
        raise ValueError(msg)
    return value


class Message(BaseModel):
    """A chat message: its ``role`` and ``content``; other fields (``name``, ``tool_calls``...) are kept."""

    model_config = ConfigDict(extra="allow")
    role: StrictStr
    content: Annotated[Any, AfterValidator(_check_content)] = None


class DraftRAGOptions(BaseModel):
    """The request's ``draft_rag`` object: per-request SpecPC options."""

    model_config = ConfigDict(extra="forbid")
    budget: Annotated[Any, AfterValidator(_check_budget)] = None
    """Tokens of document text to keep for this request (default: the gateway's ``--budget``)."""
    compress: StrictBool = True
    """False: the documents reach the upstream as they are."""


class ChatCompletionRequest(BaseModel):
    """The fields of ``POST /v1/chat/completions`` the gateway reads; the others are forwarded untouched."""

    model_config = ConfigDict(extra="allow")
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool | None = None
    documents: list[Annotated[Any, AfterValidator(_check_document)]] | None = None
    """Retrieved documents: strings, or ``{"text": ..., "title": ...}`` objects."""
    draft_rag: DraftRAGOptions | None = None


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
