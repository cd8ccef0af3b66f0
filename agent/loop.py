"""The controlled decode loop: generate, retrieve on a search tag, inject documents, continue.

One loop serves requests and produces training rollouts. Per round it sends the full token-id
context to the engine (which reuses what it already computed), and it keeps ids exactly as
sampled: generated ids are decoded for display and parsing, never re-encoded.

States: GENERATE -> (search-close) RETRIEVE -> INJECT -> GENERATE ... -> (answer-close, EOS,
documents tag written by the model, or a limit) FINISHED.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, replace

from agent.channels import ChannelSplitter
from agent.engine import Engine, SamplingParams, StopSpec
from agent.events import (
    AgentEvent,
    Answer,
    Documents,
    Finished,
    FinishReason,
    SearchRecord,
    SearchStarted,
    Token,
    Trajectory,
    Usage,
)
from agent.tags import TagFormat
from agent.tokenizer import Detokenizer
from retrieval.types import Passage, Retriever


@dataclass(frozen=True)
class Limits:
    """Server maxima; a request may ask for less (see `RunParams.clamp`)."""

    max_searches: int = 8
    max_tokens: int = 512  # model-sampled tokens per request
    max_context: int = 2048  # prompt + everything generated and injected
    top_k: int = 3
    retrieval_timeout_s: float = 10.0
    max_query_chars: int = 512


@dataclass(frozen=True)
class RunParams:
    """Per-request settings; `None` means the server default."""

    sampling: SamplingParams = SamplingParams()
    max_tokens: int | None = None
    max_searches: int | None = None
    top_k: int | None = None

    def clamp(self, limits: Limits) -> RunParams:
        def lower(value: int | None, cap: int) -> int:
            return cap if value is None else max(0, min(value, cap))

        return replace(
            self,
            max_tokens=lower(self.max_tokens, limits.max_tokens),
            max_searches=lower(self.max_searches, limits.max_searches),
            top_k=max(1, lower(self.top_k, limits.top_k)),
        )


class AgentLoop:
    def __init__(
        self, engine: Engine, retriever: Retriever, fmt: TagFormat, limits: Limits = Limits()
    ) -> None:
        self.engine = engine
        self.retriever = retriever
        self.fmt = fmt
        self.limits = limits
        tok = engine.tokenizer
        self._tok = tok
        self._search_close = tok.token_id(fmt.search_close)
        self._answer_close = tok.token_id(fmt.answer_close)
        self._docs_open = tok.token_id(fmt.docs_open)
        self._docs_close = tok.token_id(fmt.docs_close)
        self._stop = StopSpec(
            frozenset({self._search_close, self._answer_close, self._docs_open, tok.eos_id})
        )

    def prompt_ids(self, question: str) -> list[int]:
        bos = [self._tok.bos_id] if self._tok.bos_id is not None else []
        return bos + self._tok.encode(self.fmt.prompt(question))

    async def run(self, prompt_ids: list[int], params: RunParams) -> AsyncIterator[AgentEvent]:
        p = params.clamp(self.limits)
        assert p.max_tokens is not None and p.max_searches is not None and p.top_k is not None
        traj = Trajectory(prompt_ids=list(prompt_ids))
        usage = Usage(prompt_tokens=len(prompt_ids))
        splitter = ChannelSplitter(self.fmt.answer_open, self.fmt.answer_close)
        detok = Detokenizer(self._tok)
        reason: FinishReason = "stop"
        while True:
            budget = min(
                p.max_tokens - usage.completion_tokens,
                self.limits.max_context - len(prompt_ids) - len(traj.completion_ids),
            )
            if budget <= 0:
                reason = "length"
                break
            sampling = replace(p.sampling, max_tokens=budget)
            segment: list[int] = []
            stop_token: int | None = None
            context = traj.prompt_ids + traj.completion_ids
            stream = self.engine.generate(context, sampling, self._stop)
            async with aclosing(stream):  # cancelling the run aborts the engine work at once
                async for chunk in stream:
                    segment += chunk.ids
                    traj.completion_ids += chunk.ids
                    traj.env_mask += [1] * len(chunk.ids)
                    usage.completion_tokens += len(chunk.ids)
                    ids = chunk.ids
                    for channel, text in splitter.push(detok.push(chunk.ids)):
                        yield Token(text, ids, channel)
                        ids = []  # the ids go with the first piece of text they produced
                    if chunk.finish_reason is not None:
                        reason = chunk.finish_reason
                        stop_token = chunk.stop_token
            if reason == "length" or stop_token != self._search_close:
                if stop_token == self._docs_open:
                    traj.error = "the model wrote a documents tag itself; its text is not evidence"
                break
            query = self._query(self._tok.decode(segment))
            yield SearchStarted(query)
            docs = await self._documents(query, p, usage, traj)
            traj.completion_ids += docs.ids
            traj.env_mask += [0] * len(docs.ids)
            detok = Detokenizer(self._tok)  # documents are not part of the model's text stream
            yield docs
        for channel, text in splitter.push(detok.flush()) + splitter.flush():
            yield Token(text, [], channel)
        traj.text = self._tok.decode(traj.completion_ids)
        traj.answer = self._answer(traj.text)
        if traj.answer is not None:
            yield Answer(traj.answer)
        yield Finished(reason, usage, traj)

    def _query(self, segment_text: str) -> str:
        start = segment_text.rfind(self.fmt.search_open)
        if start < 0:
            return ""
        body = segment_text[start + len(self.fmt.search_open) :]
        return " ".join(body.replace(self.fmt.search_close, "").split())

    async def _documents(
        self, query: str, p: RunParams, usage: Usage, traj: Trajectory
    ) -> Documents:
        assert p.max_searches is not None and p.top_k is not None
        passages: list[Passage] = []
        error: str | None = None
        if usage.searches >= p.max_searches:
            error = "search budget spent; answer with what you have"
        elif not query:
            error = "empty query"
        elif len(query) > self.limits.max_query_chars:
            error = f"query longer than {self.limits.max_query_chars} characters"
        else:
            usage.searches += 1
            try:
                async with asyncio.timeout(self.limits.retrieval_timeout_s):
                    passages = (await self.retriever.search([query], p.top_k))[0]
            except TimeoutError:
                error = "retrieval timed out"
            if not passages and error is None:
                error = "no results"
        traj.searches.append(SearchRecord(query, passages, error))
        body = f" {error}" if error else self.fmt.render_documents(passages)
        ids = [self._docs_open, *self._tok.encode(body), self._docs_close]
        usage.retrieved_tokens += len(ids)
        return Documents(query, passages, self._tok.decode(ids), ids, error)

    def _answer(self, text: str) -> str | None:
        """Text inside the last answer tags, else the text after the last documents block."""
        start = text.rfind(self.fmt.answer_open)
        if start >= 0:
            body = text[start + len(self.fmt.answer_open) :]
            return body.split(self.fmt.answer_close)[0].strip()
        end = text.rfind(self.fmt.docs_close)
        tail = text[end + len(self.fmt.docs_close) :] if end >= 0 else text
        return tail.replace(self._tok.eos_token, "").strip() or None
