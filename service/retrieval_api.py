"""Retrieval over HTTP, drop-in for the research systems' retrieval servers.

  POST /retrieve   Search-R1's shape: {"queries": [...], "topk": 3, "return_scores": true}
                   -> {"result": [[{"document": {"id", "contents"}, "score"}, ...], ...]}
                   (without return_scores: [[{"id", "contents"}, ...]]); contents = '"Title"\\ntext'
  POST /queries    R1-Searcher's shape: {"queries": [...], "k": 5}
                   -> {"queries": [...], "answers": [["Title: t Text: x", ...], ...]}

Both go through the same cached retriever the agent loop uses, so a training job pointed at us
warms the cache the service reads. An empty `queries` list gets an empty result, as from the
upstream servers (Search-R1's trainer posts one when no rollout searched). A blank query in a
batch that has a non-blank one gets an empty result list (`[]`) without a search, counted in
`searchagent_retrieve_blank_queries_total`: Search-R1's generation loop posts the stripped text of
every `<search>` action, which can be empty, and one such rollout must not fail a training step.

Bad input is a 400 in OpenAI's error shape and the server keeps serving: queries that are all
blank, a query over `max_query_chars`, more queries than `max_retrieve_queries`, k out of range,
or more passages than `max_retrieve_passages` (queries x k; such a reply is tens of megabytes).
The reply is built and serialised in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import Counter
from pydantic import ConfigDict

from retrieval.remote import r1_searcher_text, search_r1_contents
from retrieval.types import Passage, RetrievalUnavailable, Retriever
from service.errors import BadRequestError, UnavailableError
from service.protocol import ApiRequest

router = APIRouter()


@dataclass(frozen=True)
class RetrievalContext:
    retriever: Retriever
    default_k: int
    max_k: int
    max_queries: int
    max_query_chars: int
    max_passages: int = 50_000
    blank_queries: Counter | None = None

    async def search(self, queries: list[str], k: int | None, k_name: str) -> list[list[Passage]]:
        """One result list per query; blank queries (in a batch with another) get `[]`."""
        if len(queries) > self.max_queries:
            raise BadRequestError(
                f"{len(queries)} queries in one request; the maximum is {self.max_queries}",
                "queries",
            )
        blank = [i for i, q in enumerate(queries) if not q.strip()]
        if queries and len(blank) == len(queries):
            which = "query 0 is" if len(queries) == 1 else f"all {len(queries)} queries are"
            raise BadRequestError(f"{which} empty", "queries.0" if len(queries) == 1 else "queries")
        for i, q in enumerate(queries):
            if len(q) > self.max_query_chars:
                raise BadRequestError(
                    f"query {i} has {len(q)} characters; the maximum is {self.max_query_chars}",
                    f"queries.{i}",
                )
        k = self.default_k if k is None else k
        if not 1 <= k <= self.max_k:
            raise BadRequestError(f"'{k_name}' must be between 1 and {self.max_k}, got {k}", k_name)
        asked = len(queries) - len(blank)
        if asked * k > self.max_passages:
            raise BadRequestError(
                f"{asked} queries x {k_name} {k} = {asked * k} passages in one reply; the "
                f"maximum is {self.max_passages}: send fewer queries or a smaller {k_name}",
                k_name,
            )
        if not queries:  # a training step where no rollout searched: nothing to do, as upstream
            return []
        if blank and self.blank_queries is not None:
            self.blank_queries.inc(len(blank))
        skip = set(blank)
        asked_queries = [q for q in queries if q.strip()]
        try:
            results = await self.retriever.search(asked_queries, k)
        except RetrievalUnavailable as exc:
            raise UnavailableError(f"retrieval backend unavailable: {exc}") from exc
        if len(results) != len(asked_queries):  # a remote backend's reply; no cache checked it
            raise UnavailableError(
                f"retrieval backend returned {len(results)} results for {len(asked_queries)} "
                "queries"
            )
        found = iter(results)
        return [[] if i in skip else next(found) for i in range(len(queries))]


def _context(request: Request) -> RetrievalContext:
    return request.app.state.retrieval


RetrievalDep = Annotated[RetrievalContext, Depends(_context)]


class RetrieveRequest(ApiRequest):
    model_config = ConfigDict(extra="allow")
    queries: list[str]
    topk: int | None = None
    return_scores: bool = False


class QueriesRequest(ApiRequest):
    model_config = ConfigDict(extra="allow")
    queries: list[str]
    k: int | None = None


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


async def _json_reply(head: str, rows: list[Any], row: Callable[[Any], Any]) -> Response:
    """`head + [row(r) for r in rows] + "]}"` as JSON, built and encoded in a worker thread,
    one row at a time: 50,000 passages take ~0.5 s of CPU, and one `json.dumps` of the whole
    body would hold the GIL, and so the event loop, for all of it."""

    def encode() -> bytes:
        return (head + "[" + ",".join(_dumps(row(r)) for r in rows) + "]}").encode()

    return Response(await asyncio.to_thread(encode), media_type="application/json")


def _document(p: Passage) -> dict:
    return {"id": p.id, "contents": search_r1_contents(p)}


def _scored(ps: list[Passage]) -> list[dict]:
    return [{"document": _document(p), "score": float(p.score)} for p in ps]


def _documents(ps: list[Passage]) -> list[dict]:
    return [_document(p) for p in ps]


def _texts(ps: list[Passage]) -> list[str]:
    return [r1_searcher_text(p) for p in ps]


@router.post("/retrieve")
async def retrieve(req: RetrieveRequest, ctx: RetrievalDep) -> Response:
    results = await ctx.search(req.queries, req.topk, "topk")
    return await _json_reply('{"result":', results, _scored if req.return_scores else _documents)


@router.post("/queries")
async def queries(req: QueriesRequest, ctx: RetrievalDep) -> Response:
    results = await ctx.search(req.queries, req.k, "k")
    return await _json_reply(f'{{"queries":{_dumps(req.queries)},"answers":', results, _texts)
