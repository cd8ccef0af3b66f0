"""Pydantic models of the OpenAI shapes we serve — data only, no engine imports.

Field names are OpenAI's literal ones (as in vLLM's protocol.py). Our extensions are marked
`# ext`. Unknown request fields are accepted (and logged by the route), as vLLM does.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# -- requests -------------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
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


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)  # several agent runs per request: a later issue
    user: str | None = None
    max_searches: int | None = Field(default=None, ge=0)  # ext
    top_k: int | None = Field(default=None, ge=1)  # ext: passages per search


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
    search_trace: list[TraceSearch] = []  # ext


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
    search_trace: list[TraceSearch] | None = None  # ext: on the final chunk


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "searchagent"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
