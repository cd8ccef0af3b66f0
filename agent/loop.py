"""The controlled decode loop: generate, retrieve on a search tag, inject documents, continue.

One loop serves requests and produces training rollouts. Per round it sends the full token-id
context to the engine (which reuses what it already computed), and it keeps ids exactly as
sampled: generated ids are decoded for display and parsing, never re-encoded.

States: GENERATE -> (search-close) RETRIEVE -> INJECT -> GENERATE ... -> (answer-close, EOS,
documents tag written by the model, or a limit) FINISHED.

Tags are single special tokens (stop token ids) or multi-token text (stop strings, matched by the
engine over the decoded stream), as the checkpoint's `TagFormat` says. Retrieved text is escaped
(tag strings) and tokenized as untrusted text (special-token strings stay plain characters), so a
corpus cannot forge structure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Literal

from agent.channels import ChannelSplitter
from agent.engine import Engine, SamplingParams, StopSpec, TokenChunk
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
from agent.prompt import Turn, build_prompt
from agent.tags import TagFormat
from agent.tokenizer import Detokenizer
from retrieval.types import Passage, RetrievalUnavailable, Retriever

log = logging.getLogger("searchagent.agent")


@dataclass(frozen=True)
class Limits:
    """Server maxima; a request may ask for less (see `RunParams.clamp`)."""

    max_searches: int = 8
    max_tokens: int = 512  # model-sampled tokens per request
    max_context: int = 2048  # prompt + everything generated and injected
    top_k: int = 3
    retrieval_timeout_s: float = 10.0
    max_query_chars: int = 512
    deadline_s: float = 300.0  # the whole run


@dataclass(frozen=True)
class RunParams:
    """Per-request settings; `None` means the server default."""

    sampling: SamplingParams = SamplingParams()
    max_tokens: int | None = None
    max_searches: int | None = None
    top_k: int | None = None
    max_context: int | None = None
    deadline_s: float | None = None
    retrieval_timeout_s: float | None = None  # each search
    # ids the model may not sample as its first token (Retro-Search rolls out the path not taken)
    first_banned: frozenset[int] = frozenset()
    # a search the run starts with, as if the model had written it (naive RAG: the question);
    # it counts against max_searches, and its tags and query are injected (env_mask 0)
    first_search: str | None = None

    def clamp(self, limits: Limits) -> RunParams:
        """Unset values take the server's; a value above the server's is lowered to it."""

        def lower(value: int | None, cap: int) -> int:
            return cap if value is None else max(0, min(value, cap))

        def seconds(value: float | None, cap: float) -> float:
            return cap if value is None else max(0.0, min(value, cap))

        return replace(
            self,
            max_tokens=lower(self.max_tokens, limits.max_tokens),
            max_searches=lower(self.max_searches, limits.max_searches),
            top_k=max(1, lower(self.top_k, limits.top_k)),
            max_context=lower(self.max_context, limits.max_context),
            deadline_s=seconds(self.deadline_s, limits.deadline_s),
            retrieval_timeout_s=seconds(self.retrieval_timeout_s, limits.retrieval_timeout_s),
        )


BUDGET_NOTICE = "search budget spent; answer with what you have"
DEADLINE_ERROR = "request deadline exceeded"
# the notices for a search the retriever could not answer: the backend's fault, not the query's
RETRIEVAL_UNAVAILABLE = "retrieval unavailable"
RETRIEVAL_TIMED_OUT = "retrieval timed out"

_Stop = Literal["search", "answer", "documents", "eos", "length"]


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
        # tag -> what it means when a segment stops on it; as token ids or as text
        meaning: dict[str, _Stop] = {
            fmt.search_close: "search",
            fmt.answer_close: "answer",
            fmt.docs_open: "documents",
        }
        if fmt.tags_are_tokens:
            self._by_id = {tok.token_id(tag): kind for tag, kind in meaning.items()}
            self._stop = StopSpec(frozenset({*self._by_id, *tok.stop_ids}))
        else:
            self._by_id = {}
            self._stop = StopSpec(tok.stop_ids, fmt.stop_strings)
        self._by_str = {} if fmt.tags_are_tokens else meaning
        before, after = fmt.documents_block()
        self._docs_before = tok.encode(before)
        self._docs_after = tok.encode(after)

    def prompt_ids(
        self, question: str, history: Sequence[Turn] = (), system: str | None = None
    ) -> list[int]:
        """The prompt for `question`: the format's template (through the checkpoint's chat
        template for chat formats), after earlier turns and a system text (`build_prompt`).
        No client text can forge tags or special tokens."""
        bos = [self._tok.bos_id] if self._tok.bos_id is not None else []

        def safe(text: str) -> str:
            return self._tok.defuse(self.fmt.escape(text))

        turns = [(role, safe(said)) for role, said in history]
        prompt = build_prompt(
            self.fmt, self._tok, safe(question), turns, safe(system) if system else None
        )
        return bos + self._tok.encode(prompt)

    async def run(self, prompt_ids: list[int], params: RunParams) -> AsyncIterator[AgentEvent]:
        p = params.clamp(self.limits)
        assert p.max_tokens is not None and p.max_searches is not None
        assert p.max_context is not None and p.deadline_s is not None
        clock = asyncio.get_running_loop()
        deadline = clock.time() + p.deadline_s
        traj = Trajectory(prompt_ids=list(prompt_ids))
        usage = Usage(prompt_tokens=len(prompt_ids))
        splitter = ChannelSplitter(self.fmt.answer_open, self.fmt.answer_close)
        detok = Detokenizer(self._tok)
        reason: FinishReason = "stop"
        if p.first_search is not None:
            query = " ".join(p.first_search.split())
            asked = self._search_ids(query)
            traj.completion_ids += asked
            traj.env_mask += [0] * len(asked)
            yield SearchStarted(query)
            yield await self._documents(query, p, usage, traj, deadline)
        while True:
            budget = min(
                p.max_tokens - usage.completion_tokens,
                p.max_context - len(prompt_ids) - len(traj.completion_ids),
            )
            if budget <= 0:
                reason = "length"
                break
            sampling = replace(p.sampling, max_tokens=budget)
            segment: list[int] = []
            stop: _Stop = "length"
            context = traj.prompt_ids + traj.completion_ids
            if p.first_banned and not traj.completion_ids:
                stream = self._banned_first(context, sampling, p.first_banned)
            else:
                stream = self.engine.generate(context, sampling, self._stop)
            try:
                # closing the stream (cancellation, deadline) aborts the engine work at once
                async with aclosing(stream):
                    while True:
                        # the deadline bounds the wait for the engine, never a `yield`: a slow
                        # consumer must not have the deadline's cancellation land in it
                        if clock.time() >= deadline:  # chunks queued up meanwhile wait no more
                            raise TimeoutError
                        async with asyncio.timeout_at(deadline):
                            chunk = await anext(stream, None)
                        if chunk is None:
                            break
                        segment += chunk.ids
                        traj.completion_ids += chunk.ids
                        traj.env_mask += [1] * len(chunk.ids)
                        usage.completion_tokens += len(chunk.ids)
                        ids = chunk.ids
                        for channel, text in splitter.push(detok.push(chunk.ids)):
                            yield Token(text, ids, channel)
                            ids = []  # the ids go with the first piece of text they produced
                        if chunk.finish_reason is not None:
                            stop = self._stop_kind(chunk)
            except TimeoutError:
                traj.error = DEADLINE_ERROR
                stop = "length"
            if stop == "length":
                reason = "length"
                break
            if stop != "search":
                if stop == "documents":
                    traj.error = "the model wrote a documents tag itself; its text is not evidence"
                break
            query = self._query(self._tok.decode(segment))
            notified = bool(traj.searches) and traj.searches[-1].error == BUDGET_NOTICE
            if notified and usage.searches >= p.max_searches:
                traj.error = "searched again after the search budget was spent"
                break
            yield SearchStarted(query)
            docs = await self._documents(query, p, usage, traj, deadline)
            detok = Detokenizer(self._tok)  # documents are not part of the model's text stream
            yield docs
            if docs.error == DEADLINE_ERROR:
                traj.error = DEADLINE_ERROR
                reason = "length"
                break
        for channel, text in splitter.push(detok.flush()) + splitter.flush():
            yield Token(text, [], channel)
        traj.text = self._tok.decode(traj.completion_ids)
        traj.answer = self._answer(traj.text)
        if traj.answer is not None:
            yield Answer(traj.answer)
        yield Finished(reason, usage, traj)

    async def _banned_first(
        self, context: list[int], sampling: SamplingParams, banned: frozenset[int]
    ) -> AsyncIterator[TokenChunk]:
        """One segment whose first token is sampled with `banned` excluded: one token, then the
        rest as usual. (A stop string that starts in that first token is not seen.)"""
        first = self.engine.generate(
            context, replace(sampling, max_tokens=1, banned_ids=banned), self._stop
        )
        ids: list[int] = []
        last: TokenChunk | None = None
        async with aclosing(first):
            async for chunk in first:
                ids += chunk.ids
                last = chunk
        if last is None:
            yield TokenChunk([], "length")
            return
        if last.finish_reason == "stop" or sampling.max_tokens <= len(ids):
            yield replace(last, ids=ids)
            return
        yield TokenChunk(ids)  # the segment goes on
        rest = replace(sampling, max_tokens=sampling.max_tokens - len(ids))
        async with aclosing(self.engine.generate(context + ids, rest, self._stop)) as stream:
            async for chunk in stream:
                yield chunk

    def _search_ids(self, query: str) -> list[int]:
        """A search for `query` as the format writes one (the oracle's spelling: one space after
        the open tag); the query is encoded as untrusted text, so it cannot forge a tag."""
        tok, fmt = self._tok, self.fmt
        return (
            tok.encode(fmt.search_open)
            + tok.encode_untrusted(" " + fmt.escape(query))
            + tok.encode(fmt.search_close)
        )

    def _stop_kind(self, chunk: TokenChunk) -> _Stop:
        if chunk.finish_reason == "length":
            return "length"
        if chunk.stop_str is not None:
            return self._by_str.get(chunk.stop_str, "eos")
        return self._by_id.get(chunk.stop_token, "eos") if chunk.stop_token is not None else "eos"

    def _query(self, segment_text: str) -> str:
        start = segment_text.rfind(self.fmt.search_open)
        if start < 0:
            return ""
        body = segment_text[start + len(self.fmt.search_open) :]
        return " ".join(body.split(self.fmt.search_close)[0].split())

    async def _documents(
        self, query: str, p: RunParams, usage: Usage, traj: Trajectory, deadline: float
    ) -> Documents:
        """Search `query` (or say why not) and inject the documents block into `traj` (env_mask
        0), counting the search and the retrieved tokens in `usage`."""
        assert p.max_searches is not None and p.top_k is not None
        assert p.retrieval_timeout_s is not None
        passages: list[Passage] = []
        error: str | None = None
        cause: str | None = None
        if usage.searches >= p.max_searches:
            error = BUDGET_NOTICE
        elif not query:
            error = "empty query"
        elif len(query) > self.limits.max_query_chars:
            error = f"query longer than {self.limits.max_query_chars} characters"
        else:
            usage.searches += 1
            now = asyncio.get_running_loop().time()
            timeout = min(p.retrieval_timeout_s, deadline - now)
            try:
                async with asyncio.timeout(max(0.0, timeout)):
                    passages = (await self.retriever.search([query], p.top_k))[0]
            except TimeoutError:
                past = asyncio.get_running_loop().time() >= deadline
                error = DEADLINE_ERROR if past else RETRIEVAL_TIMED_OUT
                cause = f"no reply within {timeout:.3g} s"
            except RetrievalUnavailable as exc:  # the model reads a notice, the request goes on
                log.warning("retrieval failed: %s", exc)
                error, cause = RETRIEVAL_UNAVAILABLE, str(exc)
            if not passages and error is None:
                error = "no results"
        traj.searches.append(SearchRecord(query, passages, error, cause))
        body = f" {error}" if error else self.fmt.render_documents(passages)
        ids = self._docs_before + self._tok.encode_untrusted(body) + self._docs_after
        usage.retrieved_tokens += len(ids)
        traj.completion_ids += ids
        traj.env_mask += [0] * len(ids)
        return Documents(query, passages, self._tok.decode(ids), ids, error)

    def _answer(self, text: str) -> str | None:
        """Text inside the last answer tags; else the model's final free text: what follows the
        last documents block, thought or query (a checkpoint that answers without tags), or the
        whole text if it wrote no tag. None when it ends inside a thought or a query (cut by its
        token budget): its unfinished reasoning is no answer. A thought is open from its open tag
        to its close tag, documents in between (R1-Searcher searches inside its thought), and from
        the start when the prompt opens it (R1-Searcher's ends with "Assistant: <think>"). A
        documents-open tag the model wrote (which ended the run) and what follows are no answer."""
        fmt = self.fmt
        forged = text.rfind(fmt.docs_open)
        if forged >= 0 and forged > text.rfind(fmt.docs_close):
            text = text[:forged]
        start = text.rfind(fmt.answer_open)
        if start >= 0:
            body = text[start + len(fmt.answer_open) :]
            return body.split(fmt.answer_close)[0].strip()
        if fmt.think_open and fmt.think_close:
            opened, closed = text.rfind(fmt.think_open), text.rfind(fmt.think_close)
            by_prompt = fmt.prompt_template.rstrip().endswith(fmt.think_open)
            if closed < opened or (by_prompt and opened < 0 and closed < 0):
                return None
        tags = (fmt.docs_close, fmt.think_close, fmt.search_close, fmt.search_open)
        found = [(at + len(tag), tag) for tag in tags if tag and (at := text.rfind(tag)) >= 0]
        end, last = max(found, default=(0, None))
        if last == fmt.search_open:
            return None
        return text[end:].replace(self._tok.eos_token, "").strip() or None
