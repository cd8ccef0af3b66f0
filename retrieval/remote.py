"""`RemoteRetriever`: a `Retriever` over HTTP, for retrieval that runs somewhere else.

Four wire protocols (`api`):

  searchagent   our own `POST /retrieve` (same shape as search-r1, below); the default
  search-r1     Search-R1's retrieval server: POST {"queries", "topk", "return_scores": true}
                -> {"result": [[{"document": {"id", "contents"}, "score"}, ...], ...]},
                contents = '"Title"\\ntext'
  r1-searcher   R1-Searcher's server: POST {"queries", "k"} -> {"answers": [[text, ...], ...]},
                each text a raw corpus line "id\\ttext\\ttitle" (what its server returns), or
                "Title: t Text: x" (how R1-Searcher's traces show passages), or bare text
  searxng       a JSON web-search API such as SearXNG's: GET url?q=...&format=json
                -> {"results": [{"url", "title", "content"}, ...]}, one request per query

`url` is the full endpoint (`http://host:8000/retrieve`, `http://host:5004/queries`,
`http://host:8888/search`). Connection failures are retried (`retries` times); an HTTP error
status, a timeout while reading or a reply of the wrong shape (down to one bad score) raises
`RemoteError` with one line saying which. The agent loop turns that into an error document; the
request itself does not fail. A missing or null score becomes the rank-based 1 / (rank + 1).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections.abc import Callable
from typing import Any, Literal, TypeVar, get_args

import httpx

from retrieval.corpus import split_contents
from retrieval.types import Passage, RetrievalUnavailable

RemoteApi = Literal["searchagent", "search-r1", "r1-searcher", "searxng"]
APIS: tuple[str, ...] = get_args(RemoteApi)
_R1_PASSAGE = re.compile(r"\s*Title:\s*(?P<title>.*?)\s+Text:\s*(?P<text>.*)", re.DOTALL)
_T = TypeVar("_T")


class RemoteError(RetrievalUnavailable):
    """The remote retrieval service failed or answered in an unexpected shape."""


class RemoteRetriever:
    def __init__(
        self,
        url: str,
        api: str = "searchagent",
        *,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 2.0,
        retries: int = 1,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if api not in APIS:
            raise ValueError(f"unknown remote retrieval api {api!r}; choose one of {APIS}")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote retrieval url must start with http:// or https://: {url!r}")
        self.url = url
        self.api = api
        self.retries = retries
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            headers=headers,
            transport=transport,
        )

    @property
    def params(self) -> dict[str, Any]:
        return {"url": self.url, "api": self.api}

    async def aclose(self) -> None:
        await self._client.aclose()

    async def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        if not queries:
            return []
        if k <= 0:
            return [[] for _ in queries]
        if self.api == "searxng":
            return list(await asyncio.gather(*(self._searxng(q, k) for q in queries)))
        if self.api == "r1-searcher":
            body = await self._call("POST", json={"queries": queries, "k": k})
            return self._parse(_parse_r1_searcher, body, len(queries), k)
        body = await self._call("POST", json={"queries": queries, "topk": k, "return_scores": True})
        return self._parse(_parse_search_r1, body, len(queries), k)

    async def _searxng(self, query: str, k: int) -> list[Passage]:
        body = await self._call("GET", params={"q": query, "format": "json"})
        return self._parse(_parse_searxng, body, k)

    def _parse(self, parse: Callable[..., _T], body: Any, *args: Any) -> _T:
        """`parse(body, *args)`; whatever a malformed reply makes it raise becomes `RemoteError`
        (a 503 or an error document), never an unhandled TypeError (a 500)."""
        try:
            return parse(body, *args)
        except RemoteError as exc:
            raise RemoteError(f"{self.url}: {exc}") from exc
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            name = type(exc).__name__
            raise RemoteError(f"{self.url}: malformed {self.api} reply ({name}: {exc})") from exc

    async def _call(self, method: str, **kwargs: Any) -> Any:
        for attempt in range(self.retries + 1):
            try:
                reply = await self._client.request(method, self.url, **kwargs)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt == self.retries:
                    raise RemoteError(f"{self.url}: cannot connect ({exc})") from exc
            except httpx.TimeoutException as exc:
                raise RemoteError(f"{self.url}: timed out") from exc
            except httpx.HTTPError as exc:
                raise RemoteError(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        if reply.status_code != 200:
            raise RemoteError(f"{self.url}: HTTP {reply.status_code}: {reply.text[:200]}")
        try:
            return reply.json()
        except ValueError as exc:
            raise RemoteError(f"{self.url}: reply is not JSON") from exc


def _field(body: Any, name: str, kind: type) -> Any:
    if not isinstance(body, dict) or not isinstance(body.get(name), kind):
        raise RemoteError(f"reply has no {name!r} {kind.__name__}")
    return body[name]


def _per_query(body: Any, name: str, n: int) -> list[list[Any]]:
    lists = _field(body, name, list)
    if len(lists) != n or not all(isinstance(x, list) for x in lists):
        raise RemoteError(f"reply's {name!r} should hold {n} lists, one per query")
    return lists


def _score(value: Any, rank: int) -> float:
    """A result's score; missing or null gives the rank-based 1 / (rank + 1)."""
    if value is None:
        return 1.0 / (rank + 1)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise RemoteError(f"a result's score is not a number: {value!r:.40}")
    try:
        score = float(value)
    except ValueError:
        raise RemoteError(f"a result's score is not a number: {value!r:.40}") from None
    if not math.isfinite(score):  # NaN / inf would not survive our own JSON replies
        raise RemoteError(f"a result's score is not finite: {value!r:.40}")
    return score


def _parse_searxng(body: Any, k: int) -> list[Passage]:
    passages = []
    for rank, item in enumerate(_field(body, "results", list)[:k]):
        if not isinstance(item, dict):
            raise RemoteError("a result is not an object")
        # SearXNG sends null for what an engine did not give (content, sometimes url)
        title, text = str(item.get("title") or ""), str(item.get("content") or "")
        url = str(item.get("url") or "")
        doc_id = url or _text_id(f"{title}\n{text}")  # not "None" for every url-less result
        passages.append(Passage(doc_id, title, text, _score(item.get("score"), rank)))
    return passages


def _parse_search_r1(body: Any, n: int, k: int) -> list[list[Passage]]:
    out = []
    for hits in _per_query(body, "result", n):
        passages = []
        for rank, hit in enumerate(hits[:k]):
            # return_scores=false servers send bare documents instead of {"document", "score"}
            doc = hit.get("document", hit) if isinstance(hit, dict) else None
            if not isinstance(doc, dict) or not isinstance(doc.get("contents"), str):
                raise RemoteError("a result has no document.contents string")
            title, text = split_contents(doc["contents"])
            text = text.strip()
            score = _score(hit.get("score"), rank)
            doc_id = "" if doc.get("id") is None else str(doc["id"])  # JSON null: no id
            doc_id = doc_id or _text_id(doc["contents"])
            passages.append(Passage(id=doc_id, title=title, text=text, score=score))
        out.append(passages)
    return out


def _parse_r1_searcher(body: Any, n: int, k: int) -> list[list[Passage]]:
    out = []
    for texts in _per_query(body, "answers", n):
        passages = []
        for rank, raw in enumerate(texts[:k]):
            if not isinstance(raw, str):
                raise RemoteError("an answer is not a string")
            doc_id, title, text = _r1_searcher_passage(raw)
            passages.append(Passage(doc_id, title, text, score=1.0 / (rank + 1)))
        out.append(passages)
    return out


def _r1_searcher_passage(raw: str) -> tuple[str, str, str]:
    r"""(id, title, text) of one R1-Searcher answer. Its server answers with raw lines of its TSV
    corpus, "id\ttext\ttitle" (its own clients strip the id with `^\d+\s+`); traces and our
    `/queries` show "Title: t Text: x"; anything else is bare text. The id is only taken when a
    tab follows it, so bare text that opens with a number ("1984 is a novel") keeps it."""
    if match := _R1_PASSAGE.fullmatch(raw):
        return _text_id(raw), match["title"], match["text"]
    if "\t" not in raw:
        return _text_id(raw), "", raw.strip()
    fields = raw.strip().split("\t")
    doc_id = fields.pop(0).strip() if len(fields) > 1 and fields[0].strip().isdigit() else ""
    text, title = fields[0].strip(), " ".join(f.strip() for f in fields[1:])
    return doc_id or _text_id(raw), title, text


def search_r1_contents(p: Passage) -> str:
    """The inverse of `split_contents`, as Search-R1's wiki corpus writes it."""
    return f'"{p.title}"\n{p.text.strip()}'


def r1_searcher_text(p: Passage) -> str:
    """A passage as R1-Searcher's published traces show it: "Title: t Text: x"."""
    return f"Title: {p.title} Text: {p.text.strip()}"


def _text_id(text: str) -> str:
    return "sha1:" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
