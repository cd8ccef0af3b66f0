"""Admission (queue then 429), body limit (413), API keys (401), CORS, request ids, JSON logs and
per-request limits (max_context, deadline_s, retrieval_timeout_s) — each over a real uvicorn
serving the demo checkpoint."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.app import create_app
from service.middleware import JsonFormatter
from service.settings import Settings

QUESTION = "Where was Sethna Drorpethwais born?"
CHAT = {"model": "demo", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 64}


def demo_settings(demo_artifacts, **overrides) -> Settings:
    return Settings(
        model=demo_artifacts / "sft",
        index=demo_artifacts / "index",
        served_model_name="demo",
        **overrides,
    )


def gauge(base_url: str, name: str) -> float:
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def assert_openai_error(response: httpx.Response, status: int, code: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert error["message"]


def test_overload_queues_then_429_while_admitted_requests_complete(demo_artifacts, serve_app):
    """Guards against: unbounded piling-up under overload (every request slow, none refused), a
    429 without Retry-After, and a queued request being dropped instead of served once a slot
    frees."""
    app = create_app(demo_settings(demo_artifacts, max_running_requests=1, max_queued_requests=1))
    url = serve_app(app)

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            body = {**CHAT, "stream": True, "max_tokens": 200}
            async with client.stream("POST", "/v1/chat/completions", json=body) as first:
                lines = first.aiter_lines()
                assert (await anext(lines)).startswith("data: ")  # admitted and running
                queued = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
                for _ in range(200):  # until the second request waits in the queue
                    if gauge(url, "searchagent_requests_waiting") == 1:
                        break
                    await asyncio.sleep(0.02)
                assert gauge(url, "searchagent_requests_waiting") == 1
                refused = await client.post("/v1/chat/completions", json=CHAT)
                assert_openai_error(refused, 429, "server_overloaded")
                assert refused.headers["retry-after"] == "1"
                assert not queued.done()
                rest = [line async for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            second = await queued
            assert second.status_code == 200 and second.json()["choices"][0]["message"]["content"]
        assert gauge(url, "searchagent_requests_rejected_total") == 1
        assert gauge(url, "searchagent_requests_waiting") == 0

    asyncio.run(main())
    # probes and metrics are never queued or refused
    assert httpx.get(f"{url}/health").status_code == 200


def test_a_client_that_leaves_the_queue_frees_its_place(demo_artifacts, serve_app):
    """Guards against a request whose client gave up while queued keeping its queue place (a
    live client got the 429 instead) until a slot freed, then running with its body lost and
    being logged as a 400: it leaves the queue at once, counted as a 499."""
    app = create_app(demo_settings(demo_artifacts, max_running_requests=1, max_queued_requests=1))
    url = serve_app(app)

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            long = {"max_tokens": 400, "temperature": 2.0, "seed": 8}  # a long first segment
            body = {**CHAT, "stream": True, **long}
            async with client.stream("POST", "/v1/chat/completions", json=body) as first:
                lines = first.aiter_lines()
                assert (await anext(lines)).startswith("data: ")  # admitted and running
                with pytest.raises(httpx.ReadTimeout):
                    await client.post("/v1/chat/completions", json=CHAT, timeout=0.5)

                async def waiting_reaches(n: int) -> None:
                    for _ in range(250):
                        if gauge(url, "searchagent_requests_waiting") == n:
                            return
                        await asyncio.sleep(0.02)
                    assert gauge(url, "searchagent_requests_waiting") == n

                await waiting_reaches(0)  # the abandoned request leaves the queue
                queued = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
                await waiting_reaches(1)
                assert not queued.done()  # queued in the freed place, not refused
                rest = [line async for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            second = await queued
            assert second.status_code == 200 and second.json()["choices"][0]["message"]["content"]
        metrics = httpx.get(f"{url}/metrics").text
        assert 'route="/v1/chat/completions",status="499"} 1.0' in metrics
        assert gauge(url, "searchagent_requests_rejected_total") == 0

    asyncio.run(main())


def test_non_streaming_request_is_cancelled_when_its_client_leaves(demo_artifacts, serve_app):
    """Guards against: an abandoned non-streaming request running its whole agent loop (up to
    the deadline) and holding an admission slot — clients that time out and retry would fill
    the server with work nobody reads."""
    app = create_app(demo_settings(demo_artifacts, max_running_requests=1))
    url = serve_app(app)
    engine = app.state.chat.loop.engine
    body = {**CHAT, "max_tokens": 400, "temperature": 2.0, "seed": 8}  # a long first segment
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)
    left = time.monotonic()
    while gauge(url, "searchagent_requests_running") or engine.running:
        assert time.monotonic() - left < 1.0, "the run went on after its client left"
        time.sleep(0.02)
    ok = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60)  # the slot is free
    assert ok.status_code == 200


def test_body_over_the_limit_is_413(demo_artifacts, serve_app):
    """Guards against: a huge body being read into memory and parsed, whether it announces its
    size (Content-Length) or streams it chunked."""
    url = serve_app(create_app(demo_settings(demo_artifacts, max_body_bytes=4000)))
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_openai_error(
        httpx.post(f"{url}/v1/chat/completions", json=big), 413, "request_too_large"
    )

    def chunked():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    response = httpx.post(
        f"{url}/v1/chat/completions",
        content=chunked(),
        headers={"content-type": "application/json"},
    )
    assert "content-length" not in response.request.headers  # really sent chunked
    assert_openai_error(response, 413, "request_too_large")
    ok = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60)
    assert ok.status_code == 200


def test_api_keys(demo_artifacts, serve_app, caplog):
    """Guards against: an open server when keys are set, one of several keys not working, a 401
    the OpenAI SDK cannot map to AuthenticationError, probes needing a key (orchestrators have
    none), and a key reaching the logs."""
    keys = ["sk-first-0123456789", "sk-second-9876543210"]
    url = serve_app(create_app(demo_settings(demo_artifacts, api_keys=keys)))
    with caplog.at_level(logging.INFO):
        missing = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
        assert_openai_error(missing, 401, "invalid_api_key")
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-first-0123"})
        assert_openai_error(wrong, 401, "invalid_api_key")
        assert httpx.post(f"{url}/retrieve", json={"queries": ["x"]}).status_code == 401
        for path in ("/health", "/ready", "/metrics"):
            assert httpx.get(f"{url}{path}").status_code == 200
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=keys[1], max_retries=0)
        assert [m.id for m in client.models.list().data] == ["demo"]
        answer = client.chat.completions.create(model="demo", messages=CHAT["messages"])
        assert answer.choices[0].message.content
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    logged = caplog.text + "".join(JsonFormatter().format(r) for r in caplog.records)
    assert "sk-first" not in logged and "sk-second" not in logged and "sk-nope" not in logged
    assert any(getattr(r, "status", None) == 401 for r in caplog.records)


def test_cors_allows_configured_origins_only(demo_artifacts, serve_app):
    """Guards against: a browser playground on another origin being blocked, any origin being
    allowed, and a preflight needing an API key (browsers never send one on OPTIONS)."""
    settings = demo_settings(demo_artifacts, cors_origins=["http://ui.example"], api_keys=["k1"])
    url = serve_app(create_app(settings))
    preflight = {
        "Access-Control-Request-Method": "POST",
        # openai-node sends its X-Stainless-* headers on every request, browsers included
        "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os",
    }
    ok = httpx.options(
        f"{url}/v1/chat/completions", headers={"Origin": "http://ui.example", **preflight}
    )
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "http://ui.example"
    other = httpx.options(
        f"{url}/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in other.headers
    got = httpx.get(
        f"{url}/v1/models", headers={"Origin": "http://ui.example", "Authorization": "Bearer k1"}
    )
    assert got.headers["access-control-allow-origin"] == "http://ui.example"


def test_request_id_is_echoed_and_logged_as_json(demo_app, serve_app, caplog):
    """Guards against: losing the caller's correlation id, echoing a header that could inject
    into logs, and access logs that are not one JSON object per line."""
    url = serve_app(demo_app)
    with caplog.at_level(logging.INFO, logger="searchagent.access"):
        mine = httpx.post(
            f"{url}/v1/chat/completions",
            json=CHAT,
            headers={"X-Request-ID": "trace-42"},
            timeout=60,
        )
        made = httpx.get(f"{url}/v1/models")
        junk = httpx.get(f"{url}/v1/models", headers={"X-Request-ID": "a b\tc" + "x" * 200})
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "trace-42"
    assert len(made.headers["x-request-id"]) == 32  # generated: a uuid4 hex
    assert junk.headers["x-request-id"] != "a b\tc" + "x" * 200
    lines = [JsonFormatter().format(r) for r in caplog.records if r.name == "searchagent.access"]
    entries = [json.loads(line) for line in lines]
    chat = next(e for e in entries if e["request_id"] == "trace-42")
    assert chat["path"] == "/v1/chat/completions" and chat["status"] == 200
    assert chat["method"] == "POST" and chat["duration_ms"] > 0 and chat["level"] == "info"


def chat_both(url: str, body: dict) -> list[tuple[str, dict, float]]:
    """`body` sent non-streaming and streaming: (finish_reason, usage, seconds) of each."""
    out = []
    for stream in (False, True):
        start = time.monotonic()
        sent = {**body, "stream": stream}
        if not stream:
            got = httpx.post(f"{url}/v1/chat/completions", json=sent, timeout=60).json()
            finish, usage = got["choices"][0]["finish_reason"], got["usage"]
        else:
            sent["stream_options"] = {"include_usage": True}
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=sent, timeout=60) as r:
                lines = [ln for ln in r.iter_lines() if ln.startswith("data: {")]
            chunks = [json.loads(ln[len("data: ") :]) for ln in lines]
            finish = next(c["choices"][0]["finish_reason"] for c in chunks if c["choices"]
                          and c["choices"][0]["finish_reason"])  # fmt: skip
            usage = chunks[-1]["usage"]
        out.append((finish, usage, time.monotonic() - start))
    return out


def test_a_requests_max_context_ends_the_run_at_that_context(demo_artifacts, serve_app):
    """Guards against per-request context limits being ignored (the request models had no
    max_context: a small one generated up to max_tokens), against one above the server's
    maximum raising it, and against a prompt that fills the requested context running at all."""
    app = create_app(demo_settings(demo_artifacts))
    url = serve_app(app)
    prompt = len(app.state.chat.loop.prompt_ids(QUESTION))
    body = {**CHAT, "max_tokens": 64, "max_context": prompt + 5}
    for finish, usage, _ in chat_both(url, body):
        assert finish == "length" and usage["prompt_tokens"] == prompt
        assert usage["completion_tokens"] + usage["retrieved_tokens"] == 5
    text = {"model": "demo", "prompt": QUESTION, "max_tokens": 64}
    tokens = httpx.post(f"{url}/v1/completions", json={**text, "max_tokens": 1}, timeout=60)
    limit = tokens.json()["usage"]["prompt_tokens"] + 4
    for agent in (True, False):
        sent = {**text, "agent": agent, "max_context": limit}
        got = httpx.post(f"{url}/v1/completions", json=sent, timeout=60).json()
        assert got["usage"]["completion_tokens"] + got["usage"]["retrieved_tokens"] == 4
        assert got["choices"][0]["finish_reason"] == "length"
    small = {**CHAT, "max_context": prompt}
    refused = httpx.post(f"{url}/v1/chat/completions", json=small)
    assert_openai_error(refused, 400, "context_length_exceeded")
    assert refused.json()["error"]["param"] == "max_context"

    capped = serve_app(create_app(demo_settings(demo_artifacts, max_context=prompt + 6)))
    for finish, usage, _ in chat_both(capped, {**body, "max_context": 10**6}):
        assert finish == "length"
        assert usage["completion_tokens"] + usage["retrieved_tokens"] == 6


def test_a_requests_deadline_ends_the_run_with_the_deadline_finish(demo_artifacts, serve_app):
    """Guards against per-request deadlines being ignored (`deadline_s` was accepted and
    dropped: the run went on to max_tokens), and against one above the server's maximum
    raising it."""
    long = {**CHAT, "max_tokens": 400, "temperature": 2.0, "seed": 8}  # a long first segment
    url = serve_app(create_app(demo_settings(demo_artifacts)))
    for finish, usage, seconds in chat_both(url, {**long, "deadline_s": 0.05}):
        assert finish == "length" and usage["completion_tokens"] < 400 and seconds < 5
    capped = serve_app(create_app(demo_settings(demo_artifacts, deadline_s=0.05)))
    for finish, usage, seconds in chat_both(capped, {**long, "deadline_s": 3600}):
        assert finish == "length" and usage["completion_tokens"] < 400 and seconds < 5
    text = {"model": "demo", "prompt": QUESTION, "max_tokens": 400, "deadline_s": 0.05}
    got = httpx.post(f"{url}/v1/completions", json={**text, "temperature": 2.0, "seed": 8})
    assert got.json()["choices"][0]["finish_reason"] == "length"
    assert got.json()["usage"]["completion_tokens"] < 400


def test_a_requests_retrieval_timeout_ends_a_slow_search(demo_artifacts, serve_app):
    """Guards against per-request retrieval timeouts being ignored (the server's applied to
    every search): a search slower than the request's timeout gets the timeout notice."""

    async def slow(request):
        await asyncio.sleep(3.0)
        return JSONResponse({"result": [[] for _ in (await request.json())["queries"]]})

    retrieval = serve_app(Starlette(routes=[Route("/retrieve", slow, methods=["POST"])]))
    settings = Settings(
        model=demo_artifacts / "sft", served_model_name="demo", retriever="remote",
        retriever_url=f"{retrieval}/retrieve", retrieval_timeout_s=30.0,
    )  # fmt: skip
    url = serve_app(create_app(settings))
    start = time.monotonic()
    got = httpx.post(
        f"{url}/v1/chat/completions", json={**CHAT, "retrieval_timeout_s": 0.2}, timeout=60
    ).json()
    assert time.monotonic() - start < 3.0
    assert got["search_trace"] and got["search_trace"][0]["error"] == "retrieval timed out"


@pytest.mark.parametrize(
    ("route", "field", "value"),
    [
        ("chat", "max_context", 0),
        ("chat", "deadline_s", -1),
        ("chat", "retrieval_timeout_s", "soon"),
        ("completions", "max_context", -5),
        ("completions", "deadline_s", 0),
        ("completions", "retrieval_timeout_s", 0),
    ],
)
def test_bad_per_request_limits_are_400s(demo_app, serve_app, route, field, value):
    """Guards against a non-positive or non-numeric limit being accepted (or failing as a 500):
    each is a 400 in OpenAI's error shape naming the field."""
    url = serve_app(demo_app)
    if route == "chat":
        got = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, field: value})
    else:
        text = {"model": "demo", "prompt": QUESTION, field: value}
        got = httpx.post(f"{url}/v1/completions", json=text)
    assert_openai_error(got, 400, None)
    assert got.json()["error"]["param"] == field


@pytest.mark.parametrize("field", ["deadline_s", "retrieval_timeout_s"])
def test_agent_limits_are_refused_for_plain_decoding(demo_app, serve_app, field):
    """Guards against a limit that plain decoding (agent: false) cannot honour being silently
    dropped: a 400 that says it applies to agent runs."""
    body = {"model": "demo", "prompt": QUESTION, "agent": False, field: 1.0}
    got = httpx.post(f"{serve_app(demo_app)}/v1/completions", json=body)
    assert_openai_error(got, 400, None)
    assert got.json()["error"]["param"] == field and "agent runs" in got.json()["error"]["message"]
