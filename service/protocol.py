"""Pydantic models of the OpenAI shapes we serve — data only, no engine imports.

Field names are OpenAI's literal ones (as in vLLM's protocol.py). Our extensions are marked
`# ext`. Unknown request fields are accepted (and logged by the route), as vLLM does.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from json.encoder import encode_basestring
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_serializer,
    model_serializer,
    model_validator,
)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def text_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# -- requests -------------------------------------------------------------------------------


def _first_unencodable(value: object, where: str) -> str | None:
    """The path of the first string in `value` that is not valid Unicode (a lone surrogate,
    which JSON's \\uD800 escapes can carry), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
        return None
    if isinstance(value, BaseModel):
        fields = dict(value) | (value.model_extra or {})
        items: Iterable[tuple[object, object]] = fields.items()
    elif isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _first_unencodable(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


class FieldError(ValueError):
    """A whole-request check's finding about one field: pydantic reports a model validator's
    error at the body, so the field's path travels with the exception (`param` of the 400)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class ApiRequest(BaseModel):
    """A request body: every string in it must be valid Unicode (a lone surrogate cannot reach
    a tokenizer, and could not be written back in an error message)."""

    @model_validator(mode="after")
    def _unicode(self) -> ApiRequest:
        where = _first_unencodable(self, "")
        if where is not None:
            raise FieldError(where, f"{where} is not valid Unicode text (an unpaired surrogate)")
        # OpenAI and vLLM refuse it too: usage options for a stream that will not be sent
        if getattr(self, "stream_options", None) is not None and not getattr(self, "stream", True):
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        return self


def _check_logit_bias(value: dict[str, float] | None) -> dict[str, float] | None:
    """OpenAI's rule: keys are token ids (as strings), values from -100 to 100. Keys are ASCII
    digits ("²" is a digit to `str.isdigit`, not to `int`), and two keys may not name one id."""
    seen: dict[int, str] = {}
    for key, bias in (value or {}).items():
        digits = key.strip()
        if not (digits.isascii() and digits.isdigit()):
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        if int(digits) in seen:
            raise ValueError(f"logit_bias keys {seen[int(digits)]!r} and {key!r} are one token id")
        seen[int(digits)] = key
        if not -100 <= bias <= 100:
            raise ValueError(f"logit_bias values must be from -100 to 100, got {bias} for {key}")
    return value


LogitBias = Annotated[dict[str, float] | None, AfterValidator(_check_logit_bias)]
MAX_LOGIT_BIAS = 300  # token ids per request, as OpenAI allows

MAX_N = 8  # choices per chat request (each one a whole agent run)
MAX_STOP = 4  # stop strings per chat request, as OpenAI allows
MAX_COMPLETION_STOP = 64  # per completion request (vLLM sets none; each token is matched on all)
MAX_STOP_CHARS = 1024  # characters per stop string


def _check_stop(value: str | list[str] | None) -> str | list[str] | None:
    for s in [value] if isinstance(value, str) else value or []:
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"stop strings are at most {MAX_STOP_CHARS} characters, got {len(s)}")
    return value


def _null_is(default: object) -> BeforeValidator:
    """A field OpenAI's spec marks nullable whose null means its default (`"n": null`)."""
    return BeforeValidator(lambda v: default if v is None else v)


def _check_top_k(value: int | None) -> int | None:
    """Ours is passages per search. -1 and 0 are vLLM's "no top-k sampling", which clients send
    by default: they ask for nothing, so they mean unset; other values below 1 are refused."""
    if value in (-1, 0):
        return None
    if value is not None and value < 1:
        raise ValueError(
            f"top_k is this server's passages per search and must be at least 1, got {value} "
            "(there is no top-k sampling here: leave it out, or use top_p)"
        )
    return value


ChatStop = Annotated[
    str | Annotated[list[str], Field(max_length=MAX_STOP)] | None, AfterValidator(_check_stop)
]
CompletionStop = Annotated[
    str | Annotated[list[str], Field(max_length=MAX_COMPLETION_STOP)] | None,
    AfterValidator(_check_stop),
]
PassagesK = Annotated[int | None, AfterValidator(_check_top_k)]  # ext: passages per search
# ext: per-request limits of an agent run; above the server's maximum, the maximum applies
ContextTokens = Annotated[int | None, Field(ge=1)]  # prompt + generated + injected tokens
Seconds = Annotated[float | None, Field(gt=0, allow_inf_nan=False)]


def _text_part_type(value: str) -> str:
    if value != "text":
        raise ValueError(f"content parts of type {value!r} are not supported: the model reads text")
    return value


class TextPart(BaseModel):
    type: Annotated[str, AfterValidator(_text_part_type)]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(ApiRequest):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: Annotated[bool, _null_is(False)] = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    logit_bias: LogitBias = Field(default=None, max_length=MAX_LOGIT_BIAS)
    stop: ChatStop = None  # ends the answer
    n: Annotated[int, _null_is(1)] = Field(default=1, ge=1, le=MAX_N)  # each its own agent run
    user: str | None = None
    # refused with a clear 400 (search is built in), but parsed so the message can say so
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    max_searches: int | None = Field(default=None, ge=0)  # ext
    top_k: PassagesK = None
    max_context: ContextTokens = None  # ext
    deadline_s: Seconds = None  # ext: the whole run, searches included
    retrieval_timeout_s: Seconds = None  # ext: each search
    # ext: where the trace goes — reasoning_content (default), the content itself, or nowhere
    trace: Literal["reasoning", "content", "none"] = "reasoning"


class CompletionRequest(ApiRequest):
    """`POST /v1/completions`, vLLM's fields. One prompt per request: a list of prompts parses
    (so it can be refused with a clear message) but is not served."""

    model_config = ConfigDict(extra="allow")

    model: str
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    logit_bias: LogitBias = Field(default=None, max_length=MAX_LOGIT_BIAS)
    stop: CompletionStop = None
    stream: Annotated[bool, _null_is(False)] = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, _null_is(1)] = Field(default=1, ge=1, le=1)
    echo: Annotated[bool, _null_is(False)] = False
    logprobs: int | None = None
    user: str | None = None
    # vLLM's extensions
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    add_special_tokens: bool = True  # a text prompt starts with BOS (when the model has one)
    return_token_ids: bool | None = None
    agent: bool = True  # ext: run the prompt through the agent loop; false = plain decoding
    max_searches: int | None = Field(default=None, ge=0)  # ext (agent runs)
    top_k: PassagesK = None  # ext (agent runs)
    max_context: ContextTokens = None  # ext
    deadline_s: Seconds = None  # ext (agent runs)
    retrieval_timeout_s: Seconds = None  # ext (agent runs)


# -- responses ------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    retrieved_tokens: int = 0  # ext: injected document tokens
    searches: int = 0  # ext


class TracePassage(BaseModel):
    id: str
    title: str
    score: float


class TraceSearch(BaseModel):
    query: str
    passages: list[TracePassage]
    error: str | None = None
    index: int = 0  # the choice whose run searched (n > 1 lists every choice's searches)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None  # ext (vLLM, DeepSeek)
    reasoning: str | None = None  # ext (vLLM's newer name)
    refusal: None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    search_trace: list[TraceSearch] | None = None  # ext (absent with trace "none")

    @model_serializer(mode="wrap")
    def _sparse(self, handler: SerializerFunctionWrapHandler) -> dict:
        return _drop_none(handler(self), ("search_trace",))


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None  # ext
    reasoning: str | None = None  # ext


class StreamChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None

    @field_serializer("delta")
    def _sparse_delta(self, delta: Delta) -> dict:
        return delta.model_dump(exclude_none=True)  # a delta carries only what changed


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[StreamChoice]
    usage: Usage | None = None
    search_trace: list[TraceSearch] | None = None  # ext: on each choice's final chunk

    @model_serializer(mode="wrap")
    def _sparse(self, handler: SerializerFunctionWrapHandler) -> dict:
        return _drop_none(handler(self), ("search_trace",))


class ChunkFrames:
    """The SSE frames of one chat completion stream.

    A token's frame (one per generated token: the hot path) is spliced from a template: the
    chunk rendered once through pydantic with a marker in each text field, split at the
    markers, cached per (choice index, fields set). The frame is byte-identical to
    `ChatCompletionChunk(...).model_dump_json()` (tested over arbitrary text); it costs about a
    tenth of the CPU. Anything else (the role chunk, final chunks, usage) goes through pydantic.
    """

    def __init__(self, id: str, created: int, model: str) -> None:
        self.id, self.created, self.model = id, created, model
        self._templates: dict[tuple[int, tuple[str, ...]], list[str]] = {}

    def chunk(self, choices: list[StreamChoice], **extra: Any) -> str:
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, **extra
        )
        return f"data: {chunk.model_dump_json()}\n\n"

    def delta(self, index: int, delta: Delta) -> str:
        """The frame of a text-only delta of choice `index` (no finish reason)."""
        if delta.role is not None:
            return self.chunk([StreamChoice(index=index, delta=delta)])
        fields = tuple(k for k, v in delta if v is not None)  # the text fields set (role is None)
        key = (index, fields)
        if key not in self._templates:
            self._templates[key] = self._template(index, fields)
        parts = self._templates[key]
        out = [parts[0]]
        for name, part in zip(fields, parts[1:], strict=True):
            out += (encode_basestring(getattr(delta, name)), part)
        return "".join(out)

    def _template(self, index: int, fields: tuple[str, ...]) -> list[str]:
        """The chunk's frame split around each field's text (random markers: no id or model
        name holds one)."""
        marks = {name: f"\x01{uuid.uuid4().hex}\x01" for name in fields}
        rest = self.chunk([StreamChoice(index=index, delta=Delta(**marks))])
        parts = []
        for name in fields:
            head, _, rest = rest.partition(encode_basestring(marks[name]))
            parts.append(head)
        return [*parts, rest]


def _drop_none(data: dict, keys: tuple[str, ...]) -> dict:
    """Extension fields appear only when they carry something (vLLM's own fields stay null)."""
    return {k: v for k, v in data.items() if not (k in keys and v is None)}


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"]
    stop_reason: int | str | None = None  # vLLM: the stop string or stop token id; None for EOS
    token_ids: list[int] | None = None  # vLLM, with return_token_ids: every sampled id
    prompt_token_ids: list[int] | None = None  # vLLM, with return_token_ids
    reasoning_content: str | None = None  # ext: the trace of an agent run

    @model_serializer(mode="wrap")
    def _sparse(self, handler: SerializerFunctionWrapHandler) -> dict:
        return _drop_none(handler(self), ("reasoning_content",))


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    search_trace: list[TraceSearch] | None = None  # ext: agent runs

    @model_serializer(mode="wrap")
    def _sparse(self, handler: SerializerFunctionWrapHandler) -> dict:
        return _drop_none(handler(self), ("search_trace",))


class CompletionStreamChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None  # vLLM
    prompt_token_ids: list[int] | None = None  # vLLM: on the first chunk, with return_token_ids
    token_ids: list[int] | None = None  # vLLM: this chunk's ids, with return_token_ids
    reasoning_content: str | None = None  # ext: agent runs

    @model_serializer(mode="wrap")
    def _sparse(self, handler: SerializerFunctionWrapHandler) -> dict:
        return _drop_none(handler(self), ("reasoning_content",))


class CompletionStreamResponse(BaseModel):
    """One SSE chunk. As in vLLM, `usage` is present only on the usage chunk (`choices: []`)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: Usage | None = None
    search_trace: list[TraceSearch] | None = None  # ext: on the final chunk of an agent run

    @model_serializer(mode="wrap")
    def _sparse(self, handler: SerializerFunctionWrapHandler) -> dict:
        return _drop_none(handler(self), ("usage", "search_trace"))


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "searchagent"
    max_model_len: int | None = None  # vLLM's field: the context length


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
