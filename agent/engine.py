"""The `Engine` seam: the only thing the agent loop knows about a model.

An engine turns a full token-id context into a stream of sampled token ids. It is stateless from
the loop's point of view (every call sends the whole context); making the repeated prefix cheap
is the engine's business (KV reuse in-process, prefix caching in vLLM).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from agent.tokenizer import Tokenizer

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-call sampling settings. `temperature == 0` means greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class StopSpec:
    """When to end a segment: on any of these token ids (emitted, then stop)."""

    token_ids: frozenset[int] = field(default_factory=frozenset)


@dataclass(frozen=True)
class TokenChunk:
    """Newly sampled ids. The last chunk of a call has `finish_reason` set; when it is "stop",
    `stop_token` is the stop id that ended it (included in `ids`), or None for an EOS-less stop."""

    ids: list[int]
    finish_reason: FinishReason | None = None
    stop_token: int | None = None


class Engine(Protocol):
    """A model behind a token-id interface. Closing the iterator early aborts the work."""

    tokenizer: Tokenizer

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, stop: StopSpec
    ) -> AsyncIterator[TokenChunk]: ...
