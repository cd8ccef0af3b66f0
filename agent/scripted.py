"""`ScriptedEngine`: an `Engine` that replays fixed token segments, one per `generate` call.

Two uses: the oracle that writes SFT trajectories (it knows what to say; the loop does the real
retrieval and injection), and unit tests of the loop. It honours stop ids, stop strings and
`max_tokens` like a model engine, so the loop cannot tell it apart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from agent.engine import SamplingParams, StopSpec, StopStrings, TokenChunk
from agent.tokenizer import Tokenizer


class ScriptedEngine:
    def __init__(self, tokenizer: Tokenizer, segments: list[list[int]]) -> None:
        self.tokenizer = tokenizer
        self._segments = list(segments)
        self.calls: list[list[int]] = []  # the context each call received

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, stop: StopSpec
    ) -> AsyncIterator[TokenChunk]:
        self.calls.append(list(prompt_ids))
        segment = self._segments.pop(0) if self._segments else [self.tokenizer.eos_id]
        strings = StopStrings(self.tokenizer, stop.strings)
        for n, token in enumerate(segment, 1):
            if token in stop.token_ids or token in self.tokenizer.stop_ids:
                yield TokenChunk([token], "stop", token)
                return
            if (found := strings.push([token])) is not None:
                yield TokenChunk([token], "stop", stop_str=found)
                return
            if n >= params.max_tokens:
                yield TokenChunk([token], "length")
                return
            yield TokenChunk([token])
        yield TokenChunk([], "length")  # a segment that ran out without a stop
