"""retrieval/remote.py: how `RemoteRetriever` reads the replies of real upstream shapes — null and
malformed scores, R1-Searcher's raw TSV corpus lines, SearXNG's nulls — from an upstream served
by a real uvicorn that answers whatever JSON the test sets."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from live_server import serving

from retrieval.remote import RemoteError, RemoteRetriever
from retrieval.types import Passage, RetrievalUnavailable


class Upstream:
    """A retrieval server that answers every request with `reply`."""

    def __init__(self) -> None:
        self.reply: Any = None
        self.url = ""
        self.app = FastAPI()

        @self.app.api_route("/{path:path}", methods=["GET", "POST"])
        async def answer(path: str) -> JSONResponse:
            return JSONResponse(self.reply)


@pytest.fixture(scope="module")
def upstream(free_port):
    server = Upstream()
    with serving(server.app, free_port()) as url:
        server.url = url
        yield server


def search(upstream: Upstream, api: str, reply: Any, k: int = 3) -> list[Passage]:
    """One query through `RemoteRetriever(api)` against `upstream` answering `reply`."""
    upstream.reply = reply

    async def run():
        remote = RemoteRetriever(f"{upstream.url}/endpoint", api)
        try:
            return await remote.search(["who is Ada Lind"], k)
        finally:
            await remote.aclose()

    [passages] = asyncio.run(run())
    return passages


def search_r1_reply(*scores: Any) -> dict:
    hits = [
        {"document": {"id": str(i), "contents": f'"Doc {i}"\ntext {i}'}, "score": score}
        for i, score in enumerate(scores)
    ]
    return {"result": [hits]}


def searxng_reply(*scores: Any) -> dict:
    return {
        "query": "who is Ada Lind",
        "results": [
            {"url": f"https://w/{i}", "title": f"Doc {i}", "content": f"text {i}", "score": score}
            for i, score in enumerate(scores)
        ],
    }


@pytest.mark.parametrize("make", [search_r1_reply, searxng_reply], ids=["search-r1", "searxng"])
def test_null_score_falls_back_to_the_rank(upstream, make):
    """Guards against `"score": null` (an upstream without scores for some hits) failing the
    whole search with a TypeError (HTTP 500): it becomes 1 / (rank + 1), a real score is kept."""
    api = "search-r1" if make is search_r1_reply else "searxng"
    passages = search(upstream, api, make(None, 0.75, None))
    assert [p.score for p in passages] == [1.0, 0.75, 1 / 3]
    assert [p.title for p in passages] == ["Doc 0", "Doc 1", "Doc 2"]


@pytest.mark.parametrize("bad", ["high", [1.0], {"v": 1}, True, "NaN", "-Infinity"])
@pytest.mark.parametrize("make", [search_r1_reply, searxng_reply], ids=["search-r1", "searxng"])
def test_malformed_score_is_a_remote_error(upstream, make, bad):
    """Guards against a non-numeric score raising ValueError/TypeError out of the retriever
    (a 500, a crashed rollout) instead of `RemoteError`, which the loop turns into an error
    document and the retrieval routes into a 503; NaN/inf would break our own JSON replies."""
    api = "search-r1" if make is search_r1_reply else "searxng"
    reply = make(0.5, bad)
    with pytest.raises(RemoteError, match=f"{upstream.url}/endpoint: .*score") as caught:
        search(upstream, api, reply)
    assert isinstance(caught.value, RetrievalUnavailable)
    assert "\n" not in str(caught.value)


def test_malformed_reply_through_the_service_is_a_503(upstream, serve_app):
    """Guards against a malformed upstream score reaching the client as a 500 internal error:
    `/retrieve` over a remote retriever answers 503 in the OpenAI error shape."""
    from service.app import create_app
    from service.settings import Settings

    upstream.reply = search_r1_reply(0.9, "not a number")
    settings = Settings(retriever="remote", retriever_url=f"{upstream.url}/retrieve")
    url = serve_app(create_app(settings))
    reply = httpx.post(f"{url}/retrieve", json={"queries": ["who"], "topk": 2}, timeout=30)
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert error["type"] == "service_unavailable" and "retrieval" in error["message"]


def test_r1_searcher_raw_corpus_lines_are_split_into_id_title_and_text(upstream):
    """Guards against R1-Searcher's own server replies ("id\\ttext\\ttitle" corpus lines) being
    read as bare text: the model saw "4521\\tAda Lind is a painter.\\tAda Lind". The id is
    taken only when a tab follows it; the trace form and bare text keep working."""
    answers = [
        "4521\tAda Lind is a painter.\tAda Lind",
        "Title: Borin Kask Text: Borin Kask is a chemist.",
        "1984 is a novel by George Orwell.",
        "Cira Moll is a sailor.\tCira Moll",
        "Title: Dov Tarn Text: Dov Tarn\tis an architect.",
    ]
    passages = search(upstream, "r1-searcher", {"queries": ["q"], "answers": [answers]}, k=5)
    assert [(p.title, p.text) for p in passages] == [
        ("Ada Lind", "Ada Lind is a painter."),
        ("Borin Kask", "Borin Kask is a chemist."),
        ("", "1984 is a novel by George Orwell."),
        ("Cira Moll", "Cira Moll is a sailor."),
        ("Dov Tarn", "Dov Tarn\tis an architect."),
    ]
    assert passages[0].id == "4521"
    assert len({p.id for p in passages}) == 5
    assert [p.score for p in passages] == [1.0, 0.5, 1 / 3, 0.25, 0.2]


def test_searxng_nulls_are_empty_not_the_string_none(upstream):
    """Guards against SearXNG's `"content": null` / `"url": null` becoming the text "None" and
    every url-less result sharing the id "None" (deduplicated as one passage downstream)."""
    results = [
        {"url": None, "title": "A", "content": None},
        {"url": None, "title": "B", "content": "b text", "score": None},
        {"url": "https://c", "title": None, "content": "c text"},
        {"title": "D", "content": "d text"},
    ]
    passages = search(upstream, "searxng", {"query": "q", "results": results}, k=4)
    assert [(p.title, p.text) for p in passages] == [
        ("A", ""),
        ("B", "b text"),
        ("", "c text"),
        ("D", "d text"),
    ]
    assert passages[2].id == "https://c"
    assert all("None" not in (p.id + p.title + p.text) for p in passages)
    assert len({p.id for p in passages}) == 4


def test_search_r1_null_id_is_a_text_id_not_none(upstream):
    """Guards against `"id": null` in a search-r1 document becoming the id "None", shared by
    every such passage; an id of 0 stays "0"."""
    reply = search_r1_reply(0.9, 0.8, 0.7)
    hits = reply["result"][0]
    hits[0]["document"]["id"] = None
    hits[1]["document"]["id"] = None
    hits[2]["document"]["id"] = 0
    ids = [p.id for p in search(upstream, "search-r1", reply)]
    assert ids[0] != ids[1] and ids[0].startswith("sha1:") and ids[2] == "0"
