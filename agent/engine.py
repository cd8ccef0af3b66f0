"""The `Engine` seam: the only thing the agent loop knows about a model.

An engine turns a full token-id context into a stream of sampled token ids. It is stateless from
the loop's point of view (every call sends the whole context); making the repeated prefix cheap
is the engine's business (KV reuse in-process, prefix caching in vLLM).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from agent.tokenizer import Detokenizer, Tokenizer

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-call sampling settings. `temperature == 0` means greedy. `logit_bias` is OpenAI's:
    (token id, bias) pairs added to the logits before sampling (greedy included). `banned_ids`
    are never sampled in this call (Retro-Search bans the token that took a path, to roll out
    another), whatever their bias."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    banned_ids: frozenset[int] = frozenset()
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class StopSpec:
    """When to end a segment: on any of these token ids, or when the decoded text contains any of
    these strings (multi-token text tags). The token that completes a stop is always emitted —
    ids are never cut, so a stop string may end inside the last token."""

    token_ids: frozenset[int] = field(default_factory=frozenset)
    strings: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenChunk:
    """Newly sampled ids. The last chunk of a call has `finish_reason` set; when it is "stop",
    `stop_token` is the stop id that ended it (included in `ids`) or `stop_str` the stop string
    found in the text; both are None for a plain EOS stop reported without its id."""

    ids: list[int]
    finish_reason: FinishReason | None = None
    stop_token: int | None = None
    stop_str: str | None = None


class StopStrings:
    """Finds stop strings in a token stream, over incremental detokenization.

    Text is matched, not ids, so a stop string that spans several tokens or ends inside one is
    found on the token that completes it — also when that token's text ends in an unfinished
    UTF-8 character, which the detokenizer holds back: the held text is decoded provisionally
    and searched without its trailing U+FFFD (no stop string contains one, and the characters
    before it are final). Only the tail that could still hold the start of a match is kept, so
    each push costs O(longest stop string).
    """

    def __init__(self, tokenizer: Tokenizer, strings: tuple[str, ...]) -> None:
        self.strings = tuple(s for s in strings if s)
        self._tok = tokenizer
        self._detok = Detokenizer(tokenizer)
        self._keep = max((len(s) for s in self.strings), default=1) - 1
        self._tail = ""
        self._released: list[int] = []  # the ids of the detokenizer's last text (context)
        self._held: list[int] = []  # ids pushed since, whose text it holds back
        self._early = 0  # characters of the held text already searched (provisionally)

    def push(self, ids: list[int]) -> str | None:
        """Feed newly sampled ids; the stop string they complete, if any (earliest in the text)."""
        if not self.strings:
            return None
        text = self._detok.push(ids)
        if text:  # it begins with the provisional text already searched
            self._released, self._held = self._held + ids, []
            new, self._early = text[self._early :], 0
        else:
            self._held += ids
            provisional = self._provisional()
            new, self._early = provisional[self._early :], max(self._early, len(provisional))
        self._tail += new
        found = [(pos, s) for s in self.strings if (pos := self._tail.find(s)) >= 0]
        self._tail = self._tail[-self._keep :] if self._keep else ""
        return min(found)[1] if found else None

    def _provisional(self) -> str:
        """The held-back text as far as it is final: decoded after the last released ids, as
        the detokenizer will, without the unfinished character (U+FFFD) at its end."""
        before = self._tok.decode(self._released)
        return self._tok.decode(self._released + self._held)[len(before) :].rstrip("\ufffd")


class Engine(Protocol):
    """A model behind a token-id interface. Closing the iterator early aborts the work."""

    tokenizer: Tokenizer

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, stop: StopSpec
    ) -> AsyncIterator[TokenChunk]: ...
