"""What the agent loop emits, and the `Trajectory` it leaves behind.

The service streams the events; training consumes the trajectory. `env_mask` marks each completion
token 1 when the model sampled it and 0 when the loop injected it (documents, notices); it is
recorded at injection time, never reconstructed by scanning ids afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from retrieval.types import Passage

Channel = Literal["reasoning", "answer"]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Token:
    """Model-sampled text. `channel` says whether it belongs to the answer (inside the answer
    tags, tags excluded) or to the reasoning trace (thoughts, tags, queries)."""

    text: str
    ids: list[int]
    channel: Channel


@dataclass(frozen=True)
class SearchStarted:
    query: str


@dataclass(frozen=True)
class Documents:
    """Injected evidence: the passages, the exact injected text and its token ids."""

    query: str
    passages: list[Passage]
    text: str
    ids: list[int]
    error: str | None = None


@dataclass(frozen=True)
class Answer:
    text: str


@dataclass
class SearchRecord:
    query: str
    passages: list[Passage]
    error: str | None = None  # the notice the model read instead of documents
    cause: str | None = None  # why the retriever failed (for logs, never shown to the model)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0  # model-sampled only
    retrieved_tokens: int = 0  # injected by the loop
    searches: int = 0


@dataclass
class Trajectory:
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)  # 1 sampled, 0 injected; len == completion
    searches: list[SearchRecord] = field(default_factory=list)
    text: str = ""  # decoded completion (sampled and injected), for display and parsing
    answer: str | None = None
    error: str | None = None  # a format violation that ended the run early


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    usage: Usage
    trajectory: Trajectory


AgentEvent = Token | SearchStarted | Documents | Answer | Finished
