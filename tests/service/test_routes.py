"""The OpenAI-compatible routes over a real uvicorn, driven by the official `openai` client and
raw httpx for the wire details."""

from __future__ import annotations

import json

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def question(known_question) -> str:
    return known_question["question"]


@pytest.fixture(scope="module")
def base_url(service):
    return service[0]


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client):
    """Guards against a model id the client cannot discover."""
    assert [m.id for m in client.models.list().data] == ["tiny"]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_completion_parses_with_the_official_client(client, stream, question):
    """Guards against responses the OpenAI SDK cannot parse, streaming or not."""
    messages = [{"role": "user", "content": question}]
    if not stream:
        r = client.chat.completions.create(model="tiny", messages=messages)
        choice = r.choices[0]
        assert choice.finish_reason in ("stop", "length")
        assert isinstance(choice.message.content, str)
        extra = choice.message.model_extra or {}
        assert isinstance(extra.get("reasoning_content"), str)
        assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
        assert "searches" in (r.usage.model_extra or {})
        return
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_stream_frames_follow_vllm_wire_format(base_url, question):
    """Guards against frames a vLLM client would not expect: role first, finish_reason last,
    usage only when asked, [DONE] at the end, documents in reasoning_content."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": question}],
        "stream": True,
    }
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all(c["usage"] is None for c in chunks)
    assert len({c["id"] for c in chunks}) == 1


def test_non_streaming_and_streaming_agree(base_url, question):
    """Guards against the two paths building different answers from the same greedy run."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": question}]}
    plain = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60).json()
    with httpx.stream(
        "POST", f"{base_url}/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks)
    message = plain["choices"][0]["message"]
    assert content == message["content"]
    assert reasoning == (message["reasoning_content"] or "")
    assert plain["usage"]["searches"] == len(plain["search_trace"])


@pytest.mark.parametrize(
    ("body", "status", "param_or_code"),
    [
        (b"{not json", 400, None),
        (json.dumps({"model": "tiny"}).encode(), 400, "messages"),
        (json.dumps({"model": "tiny", "messages": []}).encode(), 400, "messages"),
        (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).encode(),
         404, "model_not_found"),
        (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "  "}]}).encode(),
         400, "messages"),
        (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                     "temperature": 9}).encode(), 400, "temperature"),
        (json.dumps({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}).encode(),
         400, None),
        (json.dumps([1, 2]).encode(), 400, None),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_shaped_4xx(base_url, body, status, param_or_code):
    """Guards against client mistakes surfacing as 500s or as non-OpenAI error bodies."""
    r = httpx.post(
        f"{base_url}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    if param_or_code:
        assert param_or_code in (error["param"], error["code"])


def test_official_client_raises_typed_errors(client):
    """Guards against error bodies the SDK cannot map to its exception types."""
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"


def test_unknown_route_is_openai_shaped(base_url):
    """Guards against HTML/Starlette-shaped 404s."""
    r = httpx.get(f"{base_url}/v1/nothing-here", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_health_and_metrics(base_url, client, question):
    """Guards against metrics that never move: a request must show up in the counters, and so
    must a request rejected before it reached the route (validation errors)."""
    assert httpx.get(f"{base_url}/health", timeout=10).json() == {"status": "ok"}
    httpx.post(f"{base_url}/v1/chat/completions", json={"model": "tiny"}, timeout=10)
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}])
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    assert 'searchagent_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'searchagent_requests_total{route="/v1/chat/completions",status="400"}' in text
    for name in (
        "searchagent_request_duration_seconds_bucket",
        "searchagent_searches_per_request_count",
        "searchagent_generation_tokens_total",
        "searchagent_cache_hits_total",
        "searchagent_cache_misses_total",
        "searchagent_cache_errors_total",
        "searchagent_requests_running",
    ):
        assert name in text
    generated = next(
        line for line in text.splitlines() if line.startswith("searchagent_generation_tokens_total")
    )
    assert float(generated.split()[-1]) > 0
