"""POST /retrieve and /queries: `searchagent retrieve-serve` as a real process, driven with the
research systems' exact requests; `RemoteRetriever` against it; Redis killed mid-run."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

import httpx
import pytest
from fastapi import FastAPI

from retrieval.index import load_index
from retrieval.remote import RemoteError, RemoteRetriever


@pytest.fixture(scope="module")
def server(small_index, serve_cli):
    with serve_cli(["retrieve-serve", "--index", str(small_index)], timeout_s=60) as url:
        yield url


@pytest.fixture(scope="module")
def gold(small_world) -> list[tuple[str, str]]:
    """(query, title of the passage that answers it) for a few 1-hop test questions."""
    rows = [json.loads(x) for x in (small_world / "test.jsonl").read_text().splitlines()]
    onehop = [r for r in rows if r["type"] == "1hop"][:4]
    return [(r["question"], r["entities"][0]) for r in onehop]


def passages2string(retrieval_result: list[dict]) -> str:
    """How Search-R1's generation loop reads a /retrieve result (`_passages2string`)."""
    out = ""
    for idx, doc_item in enumerate(retrieval_result):
        content = doc_item["document"]["contents"]
        title = content.split("\n")[0]
        text = "\n".join(content.split("\n")[1:])
        out += f"Doc {idx + 1}(Title: {title}) {text}\n"
    return out


def test_search_r1_request_is_answered_in_search_r1_shape(server, gold):
    """Guards against Search-R1's training/inference scripts breaking when pointed at us: its
    exact request, parsed its way, yields titled passages with the answering one first."""
    body = {"queries": [q for q, _ in gold], "topk": 3, "return_scores": True}
    reply = httpx.post(f"{server}/retrieve", json=body, timeout=30)
    assert reply.status_code == 200
    results = reply.json()["result"]
    assert len(results) == len(gold)
    for result, (_, title) in zip(results, gold, strict=True):
        assert len(result) == 3
        assert all(isinstance(item["score"], float) for item in result)
        assert [item["score"] for item in result] == sorted(
            (item["score"] for item in result), reverse=True
        )
        text = passages2string(result)
        assert text.startswith(f'Doc 1(Title: "{title}") ')
        assert text.count("Doc ") == 3
    plain = httpx.post(f"{server}/retrieve", json={"queries": [gold[0][0]], "topk": 2}).json()
    assert set(plain["result"][0][0]) == {"id", "contents"}  # no scores asked: bare documents


def test_r1_searcher_request_is_answered_in_r1_searcher_shape(server, small_index, gold):
    """Guards against R1-Searcher's scripts breaking: `{"queries", "k"}` -> `answers`, one list
    of passage strings per query (the index's top k), each as R1-Searcher's traces show them."""
    queries = [q for q, _ in gold]
    reply = httpx.post(f"{server}/queries", json={"queries": queries, "k": 5}, timeout=30)
    assert reply.status_code == 200
    body = reply.json()
    assert body["queries"] == queries
    local = asyncio.run(load_index(small_index).search(queries, 5))
    for answers, passages, (_, title) in zip(body["answers"], local, gold, strict=True):
        assert answers == [f"Title: {p.title} Text: {p.text.strip()}" for p in passages]
        assert answers[0].startswith(f"Title: {title} Text: ")


def test_batches_search_r1_trains_with_are_answered(server, gold):
    """Guards against Search-R1's trainer crashing on a 400 (it reads `['result']` unchecked):
    it posts every rollout's search of a turn at once — none when no rollout searched, and
    512 prompts x 5 rollouts when all did."""
    reply = httpx.post(f"{server}/retrieve", json={"queries": [], "topk": 3}, timeout=30)
    assert reply.status_code == 200 and reply.json() == {"result": []}
    reply = httpx.post(f"{server}/queries", json={"queries": [], "k": 3}, timeout=30)
    assert reply.status_code == 200 and reply.json() == {"queries": [], "answers": []}
    queries = [q for q, _ in gold] * (2560 // len(gold) + 1)
    reply = httpx.post(f"{server}/retrieve", json={"queries": queries, "topk": 1}, timeout=60)
    assert reply.status_code == 200
    result = reply.json()["result"]
    assert len(result) == len(queries) and all(len(r) == 1 for r in result)
    assert result[len(gold)] == result[0]  # the same query, the same passage


BAD_BODIES = [
    ({"queries": ["ok"] * 4097, "topk": 3}, "queries"),
    ({"queries": ["   "], "topk": 3}, "queries.0"),
    ({"queries": ["", " \t"], "topk": 3}, "queries"),  # all blank: nothing to search
    ({"queries": ["ok", "x" * 100_000]}, "queries.1"),
    ({"queries": ["", "x" * 100_000]}, "queries.1"),  # a blank one beside it changes nothing
    # 4096 x 100 passages: a 140 MB reply that held the event loop for seconds
    ({"queries": [f"born city {i}" for i in range(4096)], "topk": 100}, "topk"),
    ({"queries": ["ok"], "topk": 0}, "topk"),
    ({"queries": ["ok"], "topk": 1_000_000}, "topk"),
    ({"queries": "not a list"}, "queries"),
    ({"topk": 3}, "queries"),
]


@pytest.mark.parametrize(("body", "param"), BAD_BODIES)
def test_bad_retrieve_input_is_a_400_and_the_server_keeps_serving(server, body, param):
    """Guards against bad input reaching the backend (a 500, a hang, a 100 KB query scored
    against every passage) or leaving the server unable to answer the next request."""
    reply = httpx.post(f"{server}/retrieve", json=body, timeout=30)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"]
    ok = httpx.post(f"{server}/retrieve", json={"queries": ["who"], "topk": 1}, timeout=30)
    assert ok.status_code == 200


@pytest.mark.parametrize("route", ["/retrieve", "/queries"])
def test_non_utf8_and_bad_k_are_400(server, route):
    """Guards against undecodable bytes or a bad `k` on either route crashing the handler."""
    raw = b'{"queries": ["caf\xe9"], "k": 3}'
    reply = httpx.post(
        f"{server}{route}", content=raw, headers={"content-type": "application/json"}
    )
    assert reply.status_code == 400 and "error" in reply.json()
    reply = httpx.post(f"{server}/queries", json={"queries": ["ok"], "k": -1})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "k"


def test_retrieval_only_server_has_no_chat_model(server):
    """Guards against a retrieval-only server pretending to serve a model."""
    assert httpx.get(f"{server}/v1/models").json()["data"] == []
    reply = httpx.post(
        f"{server}/v1/chat/completions",
        json={"model": "x", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert reply.status_code == 404
    assert "retrieval-only" in reply.json()["error"]["message"]
    assert httpx.get(f"{server}/ready").json() == {"status": "ready", "model": False}


@pytest.mark.parametrize("api", ["searchagent", "search-r1", "r1-searcher"])
def test_remote_retriever_returns_what_the_index_returns(server, small_index, gold, api):
    """Guards against the HTTP client losing or garbling passages on any wire format: over HTTP
    we get the same passages, in the same order, as searching the index in process."""
    path = "/queries" if api == "r1-searcher" else "/retrieve"
    queries = [q for q, _ in gold]

    async def both():
        remote = RemoteRetriever(f"{server}{path}", api)
        try:
            return await remote.search(queries, 3), await load_index(small_index).search(queries, 3)
        finally:
            await remote.aclose()

    got, want = asyncio.run(both())
    for g, w in zip(got, want, strict=True):
        assert [(p.title, p.text.strip()) for p in g] == [(p.title, p.text.strip()) for p in w]
        if api != "r1-searcher":  # R1-Searcher's wire format carries no ids or scores
            assert [p.id for p in g] == [p.id for p in w]
            assert [p.score for p in g] == pytest.approx([p.score for p in w])


def test_remote_retriever_reads_a_searxng_style_json_api(small_index, gold, serve_app):
    """Guards against the web-search mode ignoring `format=json` or misreading its results."""
    app = FastAPI()
    seen = []

    @app.get("/search")
    async def search(q: str, format: str) -> dict:
        seen.append((q, format))
        hits = (await load_index(small_index).search([q], 2))[0]
        results = [{"url": f"https://w/{p.id}", "title": p.title, "content": p.text} for p in hits]
        return {"query": q, "results": results}

    url = serve_app(app)

    async def run():
        remote = RemoteRetriever(f"{url}/search", "searxng")
        try:
            return await remote.search([gold[0][0], gold[3][0]], 2)
        finally:
            await remote.aclose()

    results = asyncio.run(run())
    assert sorted(seen) == sorted([(gold[0][0], "json"), (gold[3][0], "json")])
    assert [len(r) for r in results] == [2, 2]
    assert [r[0].title for r in results] == [gold[0][1], gold[3][1]]
    assert all(p.id.startswith("https://w/") and p.text for r in results for p in r)


def test_remote_retriever_fails_in_one_line(free_port):
    """Guards against a dead or misconfigured retrieval server surfacing as a raw traceback:
    the loop shows `RemoteError`'s message as an error document."""

    async def run(url, api="searchagent"):
        remote = RemoteRetriever(url, api, connect_timeout_s=0.5)
        try:
            return await remote.search(["q"], 3)
        finally:
            await remote.aclose()

    with pytest.raises(RemoteError, match="cannot connect"):
        asyncio.run(run(f"http://127.0.0.1:{free_port()}/retrieve"))
    with pytest.raises(ValueError, match="unknown remote retrieval api"):
        RemoteRetriever("http://127.0.0.1:1/x", "solr")


def _metric(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not exported"
    return float(match[1])


def test_redis_killed_mid_run_is_bypassed_then_used_again(small_index, redis_server, serve_app):
    """Guards against a Redis outage failing requests, going unnoticed, or disabling the cache
    for good: with Redis killed every request still succeeds and the error metric rises; after
    Redis restarts, repeated queries are hits again."""
    from service.app import create_app
    from service.settings import Settings

    url = serve_app(create_app(Settings(index=small_index, redis_url=redis_server.url)))

    def ask(query: str) -> list:
        reply = httpx.post(f"{url}/retrieve", json={"queries": [query], "topk": 2}, timeout=10)
        assert reply.status_code == 200
        return reply.json()["result"][0]

    first = ask("born city")
    assert ask("born city") == first
    assert _metric(url, "searchagent_cache_hits_total") == 1
    assert _metric(url, "searchagent_cache_errors_total") == 0

    redis_server.kill()
    assert ask("born city") == first  # a miss now, served by the backend
    assert len(ask("married spouse")) == 2
    assert _metric(url, "searchagent_cache_errors_total") >= 2

    redis_server.start()  # same port, empty
    ask("founded company")  # may still fail once on a stale pooled connection
    ask("founded company")
    hits_before = _metric(url, "searchagent_cache_hits_total")
    ask("founded company")
    assert _metric(url, "searchagent_cache_hits_total") == hits_before + 1


def test_agent_searches_through_a_remote_retrieval_server(
    server, small_index, tiny_checkpoint, known_question, serve_app
):
    """Guards against `serve --retriever remote` reaching the remote server only from the
    retrieval routes: the agent loop's searches go there too, passages intact."""
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(
        model=tiny_checkpoint, retriever="remote", retriever_url=f"{server}/retrieve",
        served_model_name="tiny", max_tokens=160,
    )  # fmt: skip
    url = serve_app(create_app(settings))
    messages = [{"role": "user", "content": known_question["question"]}]
    body = {"model": "tiny", "messages": messages}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    trace = reply.json()["search_trace"]
    assert trace and trace[0]["passages"], reply.json()
    local = asyncio.run(load_index(small_index).search([t["query"] for t in trace], 3))
    for search, passages in zip(trace, local, strict=True):
        assert [p["id"] for p in search["passages"]] == [p.id for p in passages]
    calls = _metric(url, r'searchagent_retrieval_duration_seconds_count\{backend="remote"\}')
    assert calls == len(trace)


def test_a_remote_retrieval_server_that_is_down_is_an_error_document(
    tiny_checkpoint, known_question, serve_app, free_port
):
    """Guards against a refused connection to the retrieval server failing every chat request
    with a 500 (only a timeout was turned into an error document): the model reads a notice and
    answers, the search trace says why, and /retrieve through it is a 503, not a 500."""
    from service.app import create_app
    from service.settings import Settings

    dead = f"http://127.0.0.1:{free_port()}/retrieve"  # nothing listens there
    settings = Settings(
        model=tiny_checkpoint, retriever="remote", retriever_url=dead, served_model_name="tiny",
        max_tokens=160,
    )  # fmt: skip
    url = serve_app(create_app(settings))
    body = {"model": "tiny", "messages": [{"role": "user", "content": known_question["question"]}]}
    for stream in (False, True):
        reply = httpx.post(f"{url}/v1/chat/completions", json=body | {"stream": stream}, timeout=60)
        assert reply.status_code == 200, reply.text
        if not stream:
            trace = reply.json()["search_trace"]
            assert trace and all(s["error"] == "retrieval unavailable" for s in trace), trace
        else:
            assert "internal_error" not in reply.text and "retrieval unavailable" in reply.text
    reply = httpx.post(f"{url}/retrieve", json={"queries": ["who"], "topk": 1}, timeout=60)
    assert reply.status_code == 503 and "retrieval backend unavailable" in reply.text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--retriever", "remote"], "needs a retriever_url"),
        (["--retriever", "dense"], "it is a bm25 index, not dense"),
        (["--retriever-url", "x", "--retriever", "remote"], "must start with http"),
        (["--encoder", "/nonexistent/enc"], "encoder: Value error, /nonexistent/enc is not an"),
        (["--encoder", "."], "is not an encoder directory (no config.json)"),
    ],
)
def test_retrieve_serve_bad_configuration_is_one_line(small_index, args, message):
    """Guards against a misconfigured retriever starting anyway or dying with a traceback."""
    cmd = [sys.executable, "-m", "service.cli", "retrieve-serve", "--index", str(small_index)]
    done = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("searchagent: ") and message in err


def test_serve_without_a_model_points_to_retrieve_serve(small_index):
    """Guards against `serve` silently starting without a policy when --model is forgotten."""
    cmd = [sys.executable, "-m", "service.cli", "serve", "--index", str(small_index)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip() == (
        "searchagent: serve needs --model DIR (or SEARCHAGENT_MODEL); "
        "for retrieval alone run `searchagent retrieve-serve`"
    )


def test_the_largest_allowed_reply_is_exact(server, small_index):
    """Guards against the reply built off the event loop (its own JSON encoding) differing from
    the Search-R1 shape, or the passage limit refusing a request within it: 500 queries x topk
    100 is exactly the default 50,000."""
    queries = [f"born city married {i}" for i in range(500)]
    body = {"queries": queries, "topk": 100, "return_scores": True}
    reply = httpx.post(f"{server}/retrieve", json=body, timeout=120)
    assert reply.status_code == 200, reply.text[:500]
    assert reply.headers["content-type"] == "application/json"
    local = asyncio.run(load_index(small_index).search(queries, 100))
    want = [
        [{"document": {"id": p.id, "contents": f'"{p.title}"\n{p.text.strip()}'}, "score": p.score}
         for p in ps]
        for ps in local
    ]  # fmt: skip
    assert reply.json() == {"result": want}


def test_over_the_passage_limit_is_a_400_naming_it(small_index, serve_app):
    """Guards against one request asking for more passages (queries x k) than
    `max_retrieve_passages`: it is refused before any search, on both routes, in OpenAI's shape."""
    from service.app import create_app
    from service.settings import Settings

    url = serve_app(create_app(Settings(index=small_index, max_retrieve_passages=10)))
    for route, k in (("/retrieve", "topk"), ("/queries", "k")):
        reply = httpx.post(f"{url}{route}", json={"queries": ["a", "b", "c"], k: 4}, timeout=30)
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == k
        assert "12 passages" in error["message"] and "maximum is 10" in error["message"]
        ok = httpx.post(f"{url}{route}", json={"queries": ["a", "b"], k: 5}, timeout=30)
        assert ok.status_code == 200


def test_blank_queries_in_a_batch_get_empty_results(server, gold):
    """Guards against one empty `<search>` of one rollout (Search-R1 posts every action's
    stripped text) failing the whole batch with a 400, which killed the training step: blank
    queries get `[]` on both routes, counted; the others their passages."""
    before = _metric(server, "searchagent_retrieve_blank_queries_total")
    query = gold[0][0]
    body = {"queries": ["", query, "  "], "topk": 2, "return_scores": True}
    reply = httpx.post(f"{server}/retrieve", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    alone = httpx.post(f"{server}/retrieve", json=body | {"queries": [query]}, timeout=30)
    assert reply.json()["result"] == [[], alone.json()["result"][0], []]
    reply = httpx.post(f"{server}/queries", json={"queries": [query, "\n"], "k": 2}, timeout=30)
    assert reply.status_code == 200, reply.text
    answers = reply.json()["answers"]
    assert len(answers[0]) == 2 and answers[1] == []
    assert reply.json()["queries"] == [query, "\n"]
    assert _metric(server, "searchagent_retrieve_blank_queries_total") == before + 3


def test_the_service_runs_without_a_cache(small_index, serve_app, monkeypatch):
    """Guards against SEARCHAGENT_CACHE_SIZE=0, which Settings accepts, failing start-up
    ("max_items must be >= 1"): 0 means no cache, and /retrieve answers from the index."""
    from service.app import create_app
    from service.settings import Settings

    monkeypatch.setenv("SEARCHAGENT_CACHE_SIZE", "0")
    url = serve_app(create_app(Settings(index=small_index)))
    body = {"queries": ["born city"], "topk": 2}
    first = httpx.post(f"{url}/retrieve", json=body, timeout=30)
    assert first.status_code == 200 and len(first.json()["result"][0]) == 2
    assert httpx.post(f"{url}/retrieve", json=body, timeout=30).json() == first.json()
    assert "searchagent_cache_hits_total" not in httpx.get(f"{url}/metrics").text


def test_a_remote_retriever_behind_an_api_key(small_index, serve_cli, serve_app, gold):
    """Guards against a remote retrieval server that requires a key being unusable: the key in
    SEARCHAGENT_RETRIEVER_API_KEY is sent as a Bearer token (without it: the upstream's 401,
    our 503)."""
    from pydantic import ValidationError

    from service.app import create_app
    from service.settings import Settings

    args = ["retrieve-serve", "--index", str(small_index), "--api-key", "s3cret"]
    with serve_cli(args, timeout_s=60) as upstream:
        url = f"{upstream}/retrieve"
        keyed = serve_app(
            create_app(Settings(retriever="remote", retriever_url=url, retriever_api_key="s3cret"))
        )
        bare = serve_app(create_app(Settings(retriever="remote", retriever_url=url)))
        body = {"queries": [gold[0][0]], "topk": 2}
        reply = httpx.post(f"{keyed}/retrieve", json=body, timeout=30)
        assert reply.status_code == 200, reply.text
        direct = httpx.post(url, json=body, headers={"Authorization": "Bearer s3cret"})
        assert reply.json() == direct.json()
        assert httpx.post(f"{bare}/retrieve", json=body, timeout=30).status_code == 503
    with pytest.raises(ValidationError, match="applies to retriever 'remote'"):
        Settings(index=small_index, retriever_api_key="s3cret")


def test_a_dense_index_is_served_with_the_encoder_setting(tmp_path, serve_app, monkeypatch):
    """Guards against an encoder that moved having no way in (the error said "pass
    encoder_path=...", which no command offers): SEARCHAGENT_ENCODER (`--encoder`) reaches
    `load_index`, and a bm25 index refuses it rather than ignoring it."""
    import shutil

    from retrieval.encoder import default_encoder_path
    from retrieval.index import IndexLoadError, build_index
    from service.app import create_app
    from service.settings import Settings

    pytest.importorskip("faiss", reason="the `dense` extra (faiss-cpu) is not installed")
    torch = pytest.importorskip("torch", reason="the `torch` extra is not installed")
    from safetensors.torch import load_file, save_file

    built_with = shutil.copytree(default_encoder_path(), tmp_path / "tuned")
    weights = load_file(built_with / "model.safetensors")  # fine-tuned: not the bundled one
    weights = {n: t * 1.01 if t.dtype == torch.float32 else t for n, t in weights.items()}
    save_file(weights, built_with / "model.safetensors", metadata={"format": "pt"})
    rows = [{"id": "a", "title": "Ada Lind", "text": "a painter"}, {"id": "b", "title": "B"}]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r | {"text": r.get("text", "x")}) + "\n" for r in rows))
    index = build_index(corpus, tmp_path / "dense", "dense", encoder_path=built_with)
    moved = built_with.rename(tmp_path / "moved")
    with pytest.raises(IndexLoadError, match="not found; pass --encoder DIR"):
        create_app(Settings(index=index))
    monkeypatch.setenv("SEARCHAGENT_ENCODER", str(moved))
    url = serve_app(create_app(Settings(index=index)))
    reply = httpx.post(f"{url}/retrieve", json={"queries": ["painter"], "topk": 1}, timeout=60)
    assert reply.status_code == 200 and reply.json()["result"][0][0]["id"] == "a"
    bm25 = build_index(corpus, tmp_path / "bm25", show_progress=False)
    with pytest.raises(ValueError, match="applies to a dense or hybrid index"):
        create_app(Settings(index=bm25))
