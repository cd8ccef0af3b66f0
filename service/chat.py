"""Chat completions: a request becomes one agent run; events become a response or SSE frames.

The answer goes to `content`; thoughts, search tags and injected documents go to
`reasoning_content` (and `reasoning`), so chat frontends show them as a collapsible trace.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Literal

from agent.engine import SamplingParams
from agent.events import AgentEvent, Documents, Finished, SearchStarted, Token
from agent.loop import AgentLoop, RunParams
from agent.openai_engine import EngineError
from agent.prompt import Turn
from agent.trace import parse_trace
from service.errors import BadRequestError, ContextLengthError, ModelNotFoundError, error_body
from service.metrics import Metrics
from service.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    Choice,
    ChunkFrames,
    CompletionRequest,
    Delta,
    StreamChoice,
    TracePassage,
    TraceSearch,
    Usage,
    completion_id,
    now,
)

log = logging.getLogger("searchagent.service")


@dataclass
class ChatContext:
    """What a chat handler needs from the app (kept on `app.state`)."""

    loop: AgentLoop
    model_id: str
    metrics: Metrics


TraceMode = Literal["reasoning", "content", "none"]


@dataclass
class RunState:
    """Per-choice accumulation of an agent run: what the client is sent, and when.

    `trace` decides where the trace (thoughts, search tags, documents) goes: `reasoning_content`
    (default), `content` (the raw trace, the answer inside the format's answer tags), or nowhere.
    `stops` are the client's stop strings, matched in the answer: text that could still become
    one is held back, and a match ends the visible answer there (finish_reason "stop"). The run
    itself goes on to its end — answers are short, and the usage stays exact.
    """

    trace_mode: TraceMode = "reasoning"
    stops: tuple[str, ...] = ()
    answer_tags: tuple[str, str] = ("", "")  # the format's answer tags, for trace_mode content
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    trace: list[TraceSearch] = field(default_factory=list)
    finished: Finished | None = None
    stopped: bool = False  # a stop string ended the answer
    _answer: str = ""  # the answer channel's text so far
    _sent: int = 0  # how much of `_answer` went out
    _answer_open: bool = False  # trace_mode content: the answer-open tag went out
    _final_sent: bool = False
    index: int = 0  # the choice this run answers
    generated: int = 0  # model-sampled tokens so far (the usage of a run that never finished)
    retrieved: int = 0  # injected document tokens so far

    def add(self, event: AgentEvent) -> Delta | None:
        """Record an event; the delta to stream for it, if any."""
        if isinstance(event, Token):
            self.generated += len(event.ids)
            if event.channel == "answer":
                text = self._answer_text(event.text)
                return Delta(content=text) if text else None
            return self._trace_text(event.text)
        if isinstance(event, Documents):
            self.retrieved += len(event.ids)
            passages = [TracePassage(id=p.id, title=p.title, score=p.score) for p in event.passages]
            self.trace.append(
                TraceSearch(
                    query=event.query, passages=passages, error=event.error, index=self.index
                )
            )
            return self._trace_text(event.text)
        if isinstance(event, Finished):
            self.finished = event
        return None

    def _trace_text(self, text: str) -> Delta | None:
        if self.trace_mode == "none" or not text:
            return None
        if self.trace_mode == "content":
            self.content.append(text)
            return Delta(content=text)
        self.reasoning.append(text)
        return Delta(reasoning_content=text, reasoning=text)

    def _answer_text(self, text: str) -> str:
        """Add answer text; what of it can go out now (stop strings decided)."""
        if self.stopped:
            return ""
        self._answer += text
        hits = [pos for s in self.stops if (pos := self._answer.find(s, self._sent)) >= 0]
        if hits:
            end, self.stopped = min(hits), True
        else:
            within = len(self._answer) - self._sent
            end = len(self._answer) - undecided_tail(self._answer, self.stops, within)
        out = self._answer[self._sent : end]
        self._sent = max(self._sent, end)
        if self.trace_mode == "content" and not self._answer_open and (out or self.stopped):
            out, self._answer_open = self.answer_tags[0] + out, True
        if out:
            self.content.append(out)
        return out

    def final_text(self) -> str | None:
        """Content still owed at the end, once: the loop's fallback answer (no answer tags: the
        model's free text after its last documents, thought or query; none if it ended inside a
        thought) when nothing reached the answer channel, a held-back tail
        that never became a stop string, and in trace_mode content the answer-close tag."""
        assert self.finished is not None
        if self._final_sent:
            return None
        self._final_sent = True
        out = ""
        fallback = self.finished.trajectory.answer
        # (trace "content" already sent that text, as the trace it also is)
        if not self._answer and fallback and self.trace_mode != "content":
            out += self._answer_text(fallback)
        if not self.stopped and self._sent < len(self._answer):
            tail = self._answer[self._sent :]
            self._sent = len(self._answer)
            self.content.append(tail)
            out += tail
        if self._answer_open:
            self.content.append(self.answer_tags[1])
            out += self.answer_tags[1]
        return out or None

    @property
    def finish_reason(self) -> Literal["stop", "length"]:
        assert self.finished is not None
        return "stop" if self.stopped else self.finished.reason

    def search_trace(self) -> list[TraceSearch] | None:
        return None if self.trace_mode == "none" else self.trace

    def usage(self) -> Usage:
        assert self.finished is not None
        u = self.finished.usage
        return Usage(
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            total_tokens=u.prompt_tokens + u.completion_tokens,
            retrieved_tokens=u.retrieved_tokens,
            searches=u.searches,
        )


def undecided_tail(text: str, stops: tuple[str, ...], within: int | None = None) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string. `within`
    bounds it: the text held back before the last push plus what that push added (a longer tail
    would have been held back already), so the text streams in O(new characters × stops)."""
    longest = min(len(text), max((len(s) for s in stops), default=1) - 1)
    if within is not None:
        longest = min(longest, within)
    for k in range(longest, 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0


def total_usage(states: list[RunState]) -> Usage:
    """One usage for n choices: the prompt once (as OpenAI counts it), the rest summed."""
    each = [s.usage() for s in states]
    prompt = each[0].prompt_tokens
    completion = sum(u.completion_tokens for u in each)
    retrieved = sum(u.retrieved_tokens for u in each)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,  # as OpenAI defines it; documents are retrieved_tokens
        retrieved_tokens=retrieved,
        searches=sum(u.searches for u in each),
    )


def check_model(ctx: ChatContext, model: str) -> None:
    if model != ctx.model_id:
        raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")


def check_context(
    ctx: ChatContext, prompt_ids: list[int], param: str, requested: int | None = None
) -> None:
    """A prompt must leave room for at least one generated token: within the server's context
    and within the request's own `max_context` when it asks for less."""
    limit = ctx.loop.limits.max_context
    if len(prompt_ids) >= limit:
        raise ContextLengthError(
            f"This model's maximum context length is {limit} tokens. However, your {param} "
            f"resulted in {len(prompt_ids)} tokens.",
            param=param,
        )
    if requested is not None and len(prompt_ids) >= requested:
        raise ContextLengthError(
            f"max_context {requested} leaves no room to generate: your {param} resulted in "
            f"{len(prompt_ids)} tokens.",
            param="max_context",
        )


def run_params(ctx: ChatContext, req: ChatCompletionRequest | CompletionRequest) -> RunParams:
    """An agent run's parameters from the request; the loop lowers each limit to the server's
    maximum (`RunParams.clamp`)."""
    max_tokens = req.max_tokens
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens
    return RunParams(
        sampling=sampling_params(ctx, req),
        max_tokens=max_tokens,
        max_searches=req.max_searches,
        top_k=req.top_k,
        max_context=req.max_context,
        deadline_s=req.deadline_s,
        retrieval_timeout_s=req.retrieval_timeout_s,
    )


def sampling_params(
    ctx: ChatContext, req: ChatCompletionRequest | CompletionRequest, max_tokens: int = 256
) -> SamplingParams:
    """The request's sampling fields. Unset temperature means greedy: the service's default is
    deterministic. A `logit_bias` token id outside the model's vocabulary is a 400."""
    vocab = ctx.loop.engine.tokenizer.vocab_size
    bias = tuple(sorted((int(k), float(v)) for k, v in (req.logit_bias or {}).items()))
    for token, _ in bias:
        if token >= vocab:
            raise BadRequestError(
                f"logit_bias token id {token} is out of vocabulary: the model has {vocab} tokens",
                param="logit_bias",
            )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature or 0.0,
        top_p=req.top_p or 1.0,
        seed=req.seed,
        logit_bias=bias,
    )


@dataclass
class ChatRun:
    """A validated chat request: the prompt and what each of its `n` runs needs."""

    prompt_ids: list[int]
    params: RunParams
    n: int
    trace_mode: TraceMode
    stops: tuple[str, ...]

    def new_state(self, ctx: ChatContext, index: int = 0) -> RunState:
        fmt = ctx.loop.fmt
        tags = (fmt.answer_open, fmt.answer_close)
        return RunState(self.trace_mode, self.stops, tags, index=index)

    def params_for(self, index: int) -> RunParams:
        """Choice `index`'s parameters: with a seed, each choice gets its own (seed + index)."""
        seed = self.params.sampling.seed
        if seed is None or index == 0:
            return self.params
        return replace(self.params, sampling=replace(self.params.sampling, seed=seed + index))


def conversation(
    ctx: ChatContext, messages: list[ChatMessage]
) -> tuple[str, list[Turn], str | None]:
    """(question, earlier turns, system text) from OpenAI messages. The question is the last
    user message; an assistant turn contributes its answer, not its trace (the text inside the
    format's answer tags when the client sent a raw trace back)."""
    if any(m.role == "tool" for m in messages):
        raise BadRequestError(_NO_TOOLS, param="messages")
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last is None or not messages[last].text().strip():
        raise BadRequestError("messages must contain a non-empty user message", param="messages")
    if last != len(messages) - 1:
        raise BadRequestError(
            "the last message must be the user's: this server answers a question, it does not "
            "continue an assistant message",
            param="messages",
        )
    system = "\n".join(m.text() for m in messages if m.role in ("system", "developer"))
    turns: list[Turn] = []
    for m in messages[:last]:
        if m.role == "user":
            turns.append(("user", m.text()))
        elif m.role == "assistant" and m.text().strip():
            parsed = parse_trace(m.text(), ctx.loop.fmt)
            turns.append(("assistant", parsed.answer if parsed.answer else m.text()))
    return messages[last].text(), turns, system or None


_NO_TOOLS = (
    "this server does not call client tools: search is built in — the model searches on its "
    "own, and the response's reasoning_content and search_trace show what it searched"
)


# OpenAI and vLLM request fields this server cannot honour: name -> (the values that ask for
# nothing, the message). Any other value gets a 400 naming the field, not an answer that silently
# lacks what was asked (`logprobs: true` answered with `"logprobs": null`, a JSON format never
# enforced). Unknown fields that change no output (`store`, `metadata`, ...) are logged, ignored.
_NO_LOGPROBS = "logprobs are not supported"
_NO_PENALTY = "is not supported (only 0): sampling has temperature, top_p, seed and logit_bias"
_NO_FORMAT = "only plain text: this server does not constrain decoding to a format"
_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")
_UNHONOURED_CHAT: dict[str, tuple[tuple, str]] = {
    "logprobs": ((None, False), _NO_LOGPROBS),
    "top_logprobs": ((None, 0), _NO_LOGPROBS),
    "frequency_penalty": ((None, 0), f"frequency_penalty {_NO_PENALTY}"),
    "presence_penalty": ((None, 0), f"presence_penalty {_NO_PENALTY}"),
    "response_format": ((None, {"type": "text"}), f"response_format: {_NO_FORMAT}"),
    "modalities": ((None, ["text"]), "modalities: only text"),
    "audio": ((None,), "audio output is not supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "web_search_options": ((None,), _NO_TOOLS),
    "function_call": ((None, "none", "auto"), _NO_TOOLS),
}
# vLLM's sampling extensions, on both routes
_UNHONOURED_VLLM: dict[str, tuple[tuple, str]] = {
    "best_of": ((None, 1), "best_of is not supported (only 1)"),
    "use_beam_search": ((None, False), "beam search is not supported"),
    "length_penalty": ((None, 1), "length_penalty is not supported (no beam search)"),
    "repetition_penalty": ((None, 1), "repetition_penalty is not supported (only 1)"),
    "min_p": ((None, 0), "min_p is not supported (only 0): sampling has temperature and top_p"),
    "min_tokens": ((None, 0), "min_tokens is not supported"),
    "ignore_eos": ((None, False), "ignore_eos is not supported"),
    "bad_words": ((None, []), "bad_words is not supported (logit_bias -100 bans a token)"),
    "allowed_token_ids": ((None,), "allowed_token_ids is not supported"),
    "truncate_prompt_tokens": ((None,), "truncate_prompt_tokens is not supported"),
    "prompt_logprobs": ((None,), _NO_LOGPROBS),
    "logits_processors": ((None, []), "logits_processors are not supported"),
    **{k: ((None,), f"{k}: {_NO_FORMAT}") for k in _GUIDED},
}
_UNHONOURED_CHAT |= _UNHONOURED_VLLM | {
    # vLLM's chat extensions: the prompt is the checkpoint's own, and the agent loop ends the run
    "echo": ((None, False), "echo is not supported"),
    "add_generation_prompt": ((None, True), "the prompt always ends ready for the model's turn"),
    "continue_final_message": ((None, False), "continue_final_message is not supported"),
    "chat_template": ((None,), "chat_template: the prompt is the checkpoint's own format"),
    "documents": ((None,), "documents: the model retrieves its own"),
    "stop_token_ids": ((None, []), "stop_token_ids apply to completions with agent: false"),
    "include_stop_str_in_output": ((None, False), "include_stop_str_in_output: the same"),
}
UNHONOURED_COMPLETION: dict[str, tuple[tuple, str]] = {
    **{k: _UNHONOURED_CHAT[k] for k in ("frequency_penalty", "presence_penalty")},
    "response_format": _UNHONOURED_CHAT["response_format"],
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
    **_UNHONOURED_VLLM,
}
_TOOL_CHOICE_OFF = (None, "none", "auto")  # without tools, what else would it choose


def refuse_unhonoured(extra: dict | None, fields: dict[str, tuple[tuple, str]]) -> None:
    """A 400 for the first field of `extra` (a request's unknown fields) that asks for what
    this server cannot do; the rest are logged as ignored."""
    for name, value in (extra or {}).items():
        if name in fields and value not in fields[name][0]:
            raise BadRequestError(fields[name][1], param=name)
    if extra:
        log.info("ignoring unknown request fields: %s", sorted(extra))


def prepare(ctx: ChatContext, req: ChatCompletionRequest) -> ChatRun:
    """Validate the request against the served model and build the loop's inputs."""
    check_model(ctx, req.model)
    if req.tools or req.functions:
        raise BadRequestError(_NO_TOOLS, param="tools" if req.tools else "functions")
    if req.tool_choice not in _TOOL_CHOICE_OFF:
        raise BadRequestError(_NO_TOOLS, param="tool_choice")
    refuse_unhonoured(req.model_extra, _UNHONOURED_CHAT)
    question, turns, system = conversation(ctx, req.messages)
    try:
        prompt_ids = ctx.loop.prompt_ids(question, turns, system)
    except ValueError as exc:  # the checkpoint's chat template refused these messages
        raise BadRequestError(f"these messages do not fit the model's chat template: {exc}",
                              param="messages") from exc  # fmt: skip
    check_context(ctx, prompt_ids, "messages", req.max_context)
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    params = run_params(ctx, req)
    return ChatRun(prompt_ids, params, req.n, req.trace, tuple(s for s in stops if s))


async def collect(
    ctx: ChatContext, prompt_ids: list[int], params: RunParams, state: RunState | None = None
) -> RunState:
    """Run the loop to the end (non-streaming)."""
    state = RunState() if state is None else state
    ctx.metrics.running.inc()
    try:
        async with aclosing(ctx.loop.run(prompt_ids, params)) as events:
            async for event in events:
                state.add(event)
    finally:
        ctx.metrics.running.dec()
        _count(ctx.metrics, state, len(prompt_ids))
    assert state.finished is not None
    return state


async def run_deltas(
    ctx: ChatContext, prompt_ids: list[int], params: RunParams, state: RunState
) -> AsyncIterator[Delta | None]:
    """Run the loop into `state` (streaming): each delta to send, and None when a search starts
    (the caller sends a keep-alive comment)."""
    start = time.perf_counter()
    last: float | None = None
    gap = False  # whether the time since `last` is one between two sampled deltas
    ctx.metrics.running.inc()
    try:
        async with aclosing(ctx.loop.run(prompt_ids, params)) as events:
            async for event in events:
                if isinstance(event, SearchStarted):
                    gap = False  # retrieval time is not inter-token latency
                    yield None
                delta = state.add(event)
                if delta is not None:
                    now_s = time.perf_counter()
                    if last is None:
                        ctx.metrics.ttft.observe(now_s - start)
                    elif gap and isinstance(event, Token):
                        ctx.metrics.inter_token.observe(now_s - last)
                    last, gap = now_s, isinstance(event, Token)
                    yield delta
    finally:
        ctx.metrics.running.dec()
        _count(ctx.metrics, state, len(prompt_ids))
    assert state.finished is not None


async def sse(frames: AsyncIterator[str], metrics: Metrics) -> AsyncIterator[str]:
    """SSE frames, then `data: [DONE]`. Errors before the first byte were raised as HTTP
    errors by the handler's preparation; an error after it is one error frame, then [DONE]: the
    model server's own (`engine_error`, its message, as a non-streaming request's 502 says), or
    an internal error. Either is counted, since the response's status was already 200."""
    try:
        async with aclosing(frames):
            async for frame in frames:
                yield frame
    except Exception as exc:  # noqa: BLE001 — the stream has begun; report in-band
        if isinstance(exc, EngineError):
            log.error("engine error during streaming: %s", exc)
            body = error_body(f"model server error: {exc}", "engine_error")
        else:
            log.exception("error during streaming", exc_info=exc)
            body = error_body("internal error during generation", "internal_error")
        metrics.stream_errors.labels(type=body["error"]["type"]).inc()
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


async def complete(ctx: ChatContext, req: ChatCompletionRequest) -> ChatCompletionResponse:
    run = prepare(ctx, req)
    states = [run.new_state(ctx, i) for i in range(run.n)]
    try:
        async with asyncio.TaskGroup() as group:  # one run failing cancels the others
            for i, state in enumerate(states):
                group.create_task(collect(ctx, run.prompt_ids, run.params_for(i), state))
    except ExceptionGroup as failed:  # the first failure, for the usual error handlers
        raise failed.exceptions[0] from None
    choices = []
    for i, state in enumerate(states):
        state.final_text()
        reasoning = "".join(state.reasoning) or None
        message = AssistantMessage(
            content="".join(state.content), reasoning_content=reasoning, reasoning=reasoning
        )
        choices.append(Choice(index=i, message=message, finish_reason=state.finish_reason))
    trace = None if run.trace_mode == "none" else [t for st in states for t in st.trace]
    return ChatCompletionResponse(
        id=completion_id(),
        created=now(),
        model=ctx.model_id,
        choices=choices,
        usage=total_usage(states),
        search_trace=trace,
    )


def stream(ctx: ChatContext, req: ChatCompletionRequest, run: ChatRun) -> AsyncIterator[str]:
    """SSE frames in vLLM's format. `prepare` already ran."""
    return sse(_chat_frames(ctx, req, run), ctx.metrics)


async def _chat_frames(
    ctx: ChatContext, req: ChatCompletionRequest, run: ChatRun
) -> AsyncIterator[str]:
    frames = ChunkFrames(completion_id(), now(), ctx.model_id)
    states = [run.new_state(ctx, i) for i in range(run.n)]
    for i in range(run.n):
        yield frames.chunk([StreamChoice(index=i, delta=Delta(role="assistant", content=""))])
    runs = [_choice_frames(ctx, run, i, state, frames) for i, state in enumerate(states)]
    async with aclosing(runs[0] if run.n == 1 else merge(runs)) as choice_frames:
        async for text in choice_frames:
            yield text
    if req.stream_options and req.stream_options.include_usage:
        yield frames.chunk([], usage=total_usage(states))


async def _choice_frames(
    ctx: ChatContext, run: ChatRun, index: int, state: RunState, frames: ChunkFrames
) -> AsyncIterator[str]:
    """One choice's frames: its deltas, keep-alives, then its final frame."""
    params = run.params_for(index)
    async with aclosing(run_deltas(ctx, run.prompt_ids, params, state)) as deltas:
        async for delta in deltas:
            if delta is None:
                yield ": searching\n\n"  # SSE comment: keeps proxies and clients waiting
            else:
                yield frames.delta(index, delta)
    late = state.final_text()
    if late is not None:
        yield frames.delta(index, Delta(content=late))
    final = StreamChoice(index=index, delta=Delta(), finish_reason=state.finish_reason)
    yield frames.chunk([final], search_trace=state.search_trace())


async def merge(streams: list[AsyncIterator[str]]) -> AsyncIterator[str]:
    """Items of several async iterators as they come, each drained by a task into a queue.
    Closing the merge (client gone) cancels every task, which closes its iterator and so its
    agent run; an error in one ends the merge."""
    queue: asyncio.Queue[tuple[str | None, BaseException | None]] = asyncio.Queue(16)

    async def drain(it: AsyncIterator[str]) -> None:
        try:
            async with aclosing(it):
                async for item in it:
                    await queue.put((item, None))
            await queue.put((None, None))
        except Exception as exc:  # noqa: BLE001 — handed to the consumer
            await queue.put((None, exc))

    tasks = [asyncio.create_task(drain(it)) for it in streams]
    try:
        done = 0
        while done < len(tasks):
            item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is None:
                done += 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _count(metrics: Metrics, state: RunState, prompt_tokens: int) -> None:
    """The run's work, finished or not: a run the client left, or that failed, still spent the
    engine's time on what it prefilled and sampled (the plain-decoding path counts alike)."""
    if state.finished is not None:
        u = state.finished.usage
        searches, generated, retrieved = u.searches, u.completion_tokens, u.retrieved_tokens
        prompt_tokens = u.prompt_tokens
    else:
        searches, generated, retrieved = len(state.trace), state.generated, state.retrieved
    metrics.searches.observe(searches)
    metrics.prompt_tokens.inc(prompt_tokens)
    metrics.generated_tokens.inc(generated)
    metrics.retrieved_tokens.inc(retrieved)
