"""Text completions, `POST /v1/completions`, in vLLM's request and response shapes.

One route, two handlers chosen by the `agent` extension:

- `PlainCompletion` (`agent: false`): plain decoding through the engine with vLLM's semantics,
  so our server can stand in for a vLLM completions server (the OpenAIEngine tests run against
  it). Token ids always hold every sampled token (the engine never cuts ids); the text leaves out
  a matched stop string and a stop token's text unless `include_stop_str_in_output`;
  `stop_reason` is the stop string or stop token id, None for EOS and length. While streaming,
  text that could still become a stop string is held back until it is decided.
- `AgentCompletion` (`agent: true`, the default): the prompt, as given, through the agent loop,
  the way a chat request runs: `text` is the answer, the trace goes to the `reasoning_content`
  and `search_trace` extensions (helpers shared with service/chat.py).

Differences from vLLM: one prompt and one choice per request; no logprobs or echo; an unset
`temperature` means greedy (as in our chat route); `max_tokens` is capped by the server's
maximum (plain decoding defaults to OpenAI's 16, an agent run to the server's maximum), and so is
our `max_context`; our `deadline_s` and `retrieval_timeout_s` apply to agent runs only.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from agent.engine import SamplingParams, StopSpec, TokenChunk
from agent.loop import RunParams
from agent.tokenizer import Detokenizer, Tokenizer
from service.chat import (
    UNHONOURED_COMPLETION,
    ChatContext,
    RunState,
    check_context,
    check_model,
    collect,
    refuse_unhonoured,
    run_deltas,
    run_params,
    sampling_params,
    sse,
    undecided_tail,
)
from service.errors import BadRequestError
from service.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    Usage,
    now,
    text_completion_id,
)

log = logging.getLogger("searchagent.service")

DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for completions


def prepare(ctx: ChatContext, req: CompletionRequest) -> PlainCompletion | AgentCompletion:
    """Validate the request (every client mistake raises here, before the first byte)."""
    check_model(ctx, req.model)
    refuse_unhonoured(req.model_extra, UNHONOURED_COMPLETION)
    if req.echo:
        raise BadRequestError("echo is not supported", param="echo")
    if req.logprobs is not None:
        raise BadRequestError("logprobs are not supported", param="logprobs")
    prompt_ids = _prompt_ids(ctx.loop.engine.tokenizer, req)
    check_context(ctx, prompt_ids, "prompt", req.max_context)
    if req.agent:
        for name in ("stop", "stop_token_ids", "return_token_ids"):
            if getattr(req, name):
                raise BadRequestError(
                    f"{name} applies to plain decoding (agent: false); the agent loop stops on "
                    "its own tags and mixes sampled with injected tokens",
                    param=name,
                )
        return AgentCompletion(ctx, req, prompt_ids, run_params(ctx, req))
    for name, why in _AGENT_ONLY.items():
        if getattr(req, name) is not None:
            raise BadRequestError(f"{name} applies to agent runs (agent: true): {why}", param=name)
    limits = ctx.loop.limits  # the context limit holds here too, as the agent loop's does
    context = min(limits.max_context, req.max_context or limits.max_context)
    room = context - len(prompt_ids)  # >= 1: check_context said so
    max_tokens = min(req.max_tokens or DEFAULT_MAX_TOKENS, limits.max_tokens, room)
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    stop = StopSpec(frozenset(req.stop_token_ids or ()), tuple(s for s in stops if s))
    sampling = sampling_params(ctx, req, max_tokens)
    return PlainCompletion(ctx, req, prompt_ids, sampling, stop)


# our extensions for agent runs (`top_k` is passages per search, not vLLM's sampling top_k)
_AGENT_ONLY = {
    "max_searches": "plain decoding does not search",
    "top_k": "plain decoding does not search, and has no top-k sampling",
    "deadline_s": "plain decoding has no run deadline (set a client timeout)",
    "retrieval_timeout_s": "plain decoding does not search",
}


def _prompt_ids(tok: Tokenizer, req: CompletionRequest) -> list[int]:
    prompt: Any = req.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise BadRequestError(
                f"got {len(prompt)} prompts: this server takes one prompt per request "
                "(send them as separate requests)",
                param="prompt",
            )
        prompt = prompt[0]
    if not prompt:
        raise BadRequestError("prompt must not be empty", param="prompt")
    if isinstance(prompt, str):
        ids = tok.encode(prompt)  # the client writes tags as text: special tokens are parsed
        if req.add_special_tokens and tok.bos_id is not None and ids[:1] != [tok.bos_id]:
            ids = [tok.bos_id, *ids]
        return ids
    vocab = tok.vocab_size
    bad = next((i for i in prompt if not 0 <= i < vocab), None)
    if bad is not None:
        raise BadRequestError(
            f"prompt token id {bad} is out of vocabulary (ids are 0..{vocab - 1})", param="prompt"
        )
    return list(prompt)


# -- plain decoding ---------------------------------------------------------------------------


@dataclass
class TextState:
    """What the client sees of one plain decode: the ids' text, detokenized incrementally
    (special tokens skipped when asked), without a stop token's text or a matched stop string
    unless `include_stop`, and, until the end, without a tail that could still become a stop
    string (SSE cannot take text back)."""

    detok: Detokenizer
    stops: tuple[str, ...]
    include_stop: bool
    skip_ids: frozenset[int]
    text: str = ""
    sent: int = 0  # text[:sent] has been handed out
    ids: list[int] = field(default_factory=list)

    def push(self, chunk: TokenChunk) -> str:
        """Record a chunk; the text that can be handed out now."""
        self.ids += chunk.ids
        shown = chunk.ids
        if chunk.stop_token is not None and not self.include_stop:
            if shown[-1:] == [chunk.stop_token]:
                shown = shown[:-1]  # as vLLM: the stop token's id is kept, its text is not
        self.text += self.detok.push([i for i in shown if i not in self.skip_ids])
        if chunk.finish_reason is None:
            within = len(self.text) - self.sent
            held = 0 if self.include_stop else undecided_tail(self.text, self.stops, within)
            end = len(self.text) - held
        else:
            self.text += self.detok.flush()
            end = self._end(chunk.stop_str)
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece

    def _end(self, stop_str: str | None) -> int:
        """Where the final text ends: before (or after) the stop string the engine matched.
        It is the first occurrence: the engine would have stopped at an earlier one."""
        pos = self.text.find(stop_str) if stop_str else -1
        if pos < 0:  # no stop string, or one hidden by skipped special tokens
            return len(self.text)
        return pos + (len(stop_str) if self.include_stop and stop_str else 0)


@functools.cache
def _special_ids(tok: Tokenizer) -> frozenset[int]:
    """The tokenizer's special tokens (tags, BOS, EOS, padding), for skip_special_tokens.
    `Tokenizer` has no public accessor for them, so this reads its `tokenizers` object."""
    inner = getattr(tok, "_inner", None)
    if inner is None:
        return frozenset()
    return frozenset(i for i, t in inner.get_added_tokens_decoder().items() if t.special)


@dataclass
class PlainCompletion:
    ctx: ChatContext
    req: CompletionRequest
    prompt_ids: list[int]
    sampling: SamplingParams
    stop: StopSpec

    async def complete(self) -> CompletionResponse:
        state = self._state()
        pieces: list[str] = []
        final = TokenChunk([])
        async with aclosing(self._decode(state, streaming=False)) as chunks:
            async for chunk, piece in chunks:
                pieces.append(piece)
                final = chunk
        ids = self.req.return_token_ids
        choice = CompletionChoice(
            index=0,
            text="".join(pieces),
            finish_reason=final.finish_reason or "length",
            stop_reason=self._stop_reason(final),
            token_ids=state.ids if ids else None,
            prompt_token_ids=self.prompt_ids if ids else None,
        )
        return CompletionResponse(
            id=text_completion_id(),
            created=now(),
            model=self.ctx.model_id,
            choices=[choice],
            usage=self._usage(state),
        )

    def stream(self) -> AsyncIterator[str]:
        return sse(self._frames(), self.ctx.metrics)

    async def _frames(self) -> AsyncIterator[str]:
        cid, created, model = text_completion_id(), now(), self.ctx.model_id
        ids = self.req.return_token_ids
        state = self._state()
        first = True
        async with aclosing(self._decode(state, streaming=True)) as chunks:
            async for chunk, piece in chunks:
                choice = CompletionStreamChoice(
                    index=0,
                    text=piece,
                    finish_reason=chunk.finish_reason,
                    stop_reason=self._stop_reason(chunk),
                    prompt_token_ids=self.prompt_ids if ids and first else None,
                    token_ids=chunk.ids if ids else None,
                )
                first = False
                out = CompletionStreamResponse(
                    id=cid, created=created, model=model, choices=[choice]
                )
                yield f"data: {out.model_dump_json()}\n\n"
        if self.req.stream_options and self.req.stream_options.include_usage:
            out = CompletionStreamResponse(
                id=cid, created=created, model=model, choices=[], usage=self._usage(state)
            )
            yield f"data: {out.model_dump_json()}\n\n"

    async def _decode(
        self, state: TextState, streaming: bool
    ) -> AsyncIterator[tuple[TokenChunk, str]]:
        """Each engine chunk with the text it releases; counts the request's metrics."""
        metrics = self.ctx.metrics
        start = time.perf_counter()
        metrics.running.inc()
        try:
            engine = self.ctx.loop.engine
            async with aclosing(engine.generate(self.prompt_ids, self.sampling, self.stop)) as it:
                async for chunk in it:
                    if streaming and not state.ids:
                        metrics.ttft.observe(time.perf_counter() - start)
                    yield chunk, state.push(chunk)
        finally:
            metrics.running.dec()
            metrics.prompt_tokens.inc(len(self.prompt_ids))
            metrics.generated_tokens.inc(len(state.ids))

    def _state(self) -> TextState:
        tok = self.ctx.loop.engine.tokenizer
        skip = _special_ids(tok) if self.req.skip_special_tokens else frozenset()
        return TextState(
            Detokenizer(tok), self.stop.strings, self.req.include_stop_str_in_output, skip
        )

    def _stop_reason(self, chunk: TokenChunk) -> int | str | None:
        if chunk.finish_reason != "stop":
            return None
        if chunk.stop_str is not None:
            return chunk.stop_str
        eos = self.ctx.loop.engine.tokenizer.stop_ids
        return chunk.stop_token if chunk.stop_token not in eos else None  # vLLM: None for EOS

    def _usage(self, state: TextState) -> Usage:
        n, m = len(self.prompt_ids), len(state.ids)
        return Usage(prompt_tokens=n, completion_tokens=m, total_tokens=n + m)


# -- agent runs -------------------------------------------------------------------------------


@dataclass
class AgentCompletion:
    ctx: ChatContext
    req: CompletionRequest
    prompt_ids: list[int]
    params: RunParams

    async def complete(self) -> CompletionResponse:
        state = await collect(self.ctx, self.prompt_ids, self.params)
        assert state.finished is not None
        state.final_text()  # into state.content
        choice = CompletionChoice(
            index=0,
            text="".join(state.content),
            finish_reason=state.finish_reason,
            reasoning_content="".join(state.reasoning) or None,
        )
        return CompletionResponse(
            id=text_completion_id(),
            created=now(),
            model=self.ctx.model_id,
            choices=[choice],
            usage=state.usage(),
            search_trace=state.trace,
        )

    def stream(self) -> AsyncIterator[str]:
        return sse(self._frames(), self.ctx.metrics)

    async def _frames(self) -> AsyncIterator[str]:
        cid, created, model = text_completion_id(), now(), self.ctx.model_id

        def frame(choices: list[CompletionStreamChoice], **extra: Any) -> str:
            out = CompletionStreamResponse(
                id=cid, created=created, model=model, choices=choices, **extra
            )
            return f"data: {out.model_dump_json()}\n\n"

        state = RunState()
        async with aclosing(run_deltas(self.ctx, self.prompt_ids, self.params, state)) as deltas:
            async for delta in deltas:
                if delta is None:
                    yield ": searching\n\n"  # SSE comment: keeps proxies and clients waiting
                    continue
                text = delta.content or ""
                yield frame(
                    [
                        CompletionStreamChoice(
                            index=0, text=text, reasoning_content=delta.reasoning_content
                        )
                    ]
                )
        assert state.finished is not None
        late = state.final_text()
        if late is not None:
            yield frame([CompletionStreamChoice(index=0, text=late)])
        final = CompletionStreamChoice(index=0, text="", finish_reason=state.finish_reason)
        yield frame([final], search_trace=state.trace)
        if self.req.stream_options and self.req.stream_options.include_usage:
            yield frame([], usage=state.usage())
