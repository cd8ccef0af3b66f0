"""Our responses against OpenAI's published OpenAPI spec, and through the official SDK's types.

Every chat response and stream chunk, text completions, `GET /v1/models` and every error body we
return are validated against the spec's component schemas (`openai_spec.py` turns the spec's
3.0-style `nullable` into 2020-12). Our extensions are validated with the rest, never stripped:
the spec leaves those objects open, and each key it does not declare is pinned by name below, so a
new undeclared key is a decision. The raw JSON then goes through the `openai` package's models with
strict validation and must dump back to itself; the SDK's own parse of a request must too.

Runs on the committed demo checkpoint (`demo_app`) under a real uvicorn shared by the module.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from live_server import serving
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai_spec import SPEC_PATH, Spec, load_spec

QUESTION = "Where was Sethna Drorpethwais born?"
ANSWER = "Krendeimpe"

# Keys we send that the spec does not declare (`[]`: any array item). The spec allows them (no
# additionalProperties: false on these objects; `test_the_spec_leaves_our_objects_open`).
USAGE_EXTENSIONS = {"usage.retrieved_tokens", "usage.searches"}
CHAT_EXTENSIONS = {
    "search_trace",
    "choices[].message.reasoning_content",
    "choices[].message.reasoning",
    *USAGE_EXTENSIONS,
}
CHUNK_EXTENSIONS = {
    "search_trace",
    "choices[].delta.reasoning_content",
    "choices[].delta.reasoning",
    *USAGE_EXTENSIONS,
}
COMPLETION_EXTENSIONS = {
    "search_trace",
    "choices[].reasoning_content",  # agent runs
    "choices[].stop_reason",  # vLLM's
    "choices[].token_ids",  # vLLM's
    "choices[].prompt_token_ids",  # vLLM's
    *USAGE_EXTENSIONS,
}
MODEL_EXTENSIONS = {"data[].max_model_len"}  # vLLM's


@pytest.fixture(scope="module")
def spec() -> Spec:
    loaded = load_spec()
    assert loaded is not None, f"neither {SPEC_PATH} nor the vendored subset is readable"
    return loaded


@pytest.fixture(scope="module")
def base_url(demo_app, free_port):
    with serving(demo_app, free_port()) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0)


def chat(content=QUESTION, **fields) -> dict:
    messages = [{"role": "user", "content": content}]
    return {"model": "demo", "messages": messages, "max_tokens": 96, **fields}


def conforms(spec: Spec, name: str, body: dict, extensions: set[str]) -> set[str]:
    """Assert `body` is a valid `name` with no undeclared keys beyond `extensions`; returns the
    undeclared keys it has."""
    errors = spec.errors(name, body)
    assert not errors, f"{name}:\n" + "\n".join(errors) + f"\nbody: {json.dumps(body)[:3000]}"
    undeclared = spec.undeclared(name, body)
    assert undeclared <= extensions, (
        f"{name}: keys neither in the spec nor listed as our extensions: "
        f"{sorted(undeclared - extensions)}"
    )
    return undeclared


def round_trips(model: type, raw: dict):
    """Strict validation by the SDK's type, which must dump back to exactly the raw JSON."""
    parsed = model.model_validate(raw, strict=True)
    assert parsed.model_dump(mode="json", exclude_unset=True) == raw
    return parsed


def post_sse(base_url: str, path: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed response; asserts SSE framing and the final [DONE]."""
    with httpx.stream("POST", f"{base_url}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


@pytest.fixture(scope="module")
def searched(base_url) -> dict:
    """The non-streaming response to the demo question (one search, then the answer)."""
    r = httpx.post(f"{base_url}/v1/chat/completions", json=chat(), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


# -- the validator itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "CreateChatCompletionResponse",
        "CreateChatCompletionStreamResponse",
        "CreateCompletionResponse",
        "ListModelsResponse",
        "ErrorResponse",
    ],
)
def test_the_spec_leaves_our_objects_open(spec, name):
    """Guards against silently relying on open objects: if the spec ever forbids undeclared
    keys (additionalProperties/unevaluatedProperties false) anywhere under a schema we serve,
    our extension fields violate it, and this names where."""
    closed = spec.closed_objects(name)
    assert not closed, (
        f"{name} forbids undeclared keys at {sorted(closed)}; our extensions break it"
    )


def test_the_validator_rejects_what_the_spec_forbids(spec, searched):
    """Guards against a vacuous validator (an unresolved $ref or a rewrite that accepts
    anything) and checks the `nullable` rewrite: null where 3.0 allowed it, nothing else."""
    name = "CreateChatCompletionResponse"
    assert spec.errors(name, searched) == []
    choice = searched["choices"][0]
    assert spec.errors(name, {**searched, "choices": [{**choice, "finish_reason": "weird"}]})
    assert spec.errors(name, {k: v for k, v in searched.items() if k != "choices"})
    assert spec.errors(name, {**searched, "usage": {**searched["usage"], "total_tokens": "3"}})
    chunk = {
        "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "demo",
        "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None,
                     "logprobs": None}],
        "usage": None,
    }  # fmt: skip
    stream = "CreateChatCompletionStreamResponse"
    assert spec.errors(stream, chunk) == []  # `nullable` on an enum and on a $ref
    assert spec.errors(stream, {**chunk, "usage": {"prompt_tokens": "1"}})
    bad_choice = {**chunk["choices"][0], "finish_reason": "done"}
    assert spec.errors(stream, {**chunk, "choices": [bad_choice]})
    error = {"error": {"message": "m", "type": "t", "param": None, "code": None}}
    assert spec.errors("ErrorResponse", error) == []
    assert spec.errors("ErrorResponse", {"error": {"message": "m", "type": "t", "param": None}})
    assert spec.errors("ListModelsResponse", {"object": "lists", "data": []})
    assert spec.undeclared(name, {**searched, "extra": 1}) >= {"extra"}


# -- chat completions -------------------------------------------------------------------------

CHAT_CASES = {
    "searches": chat(),
    "no_search": chat(max_searches=0, max_tokens=16),
    "cut_at_length": chat(max_tokens=4),
    "sampled": chat(temperature=0.8, top_p=0.9, seed=3, max_tokens=32),
    "two_choices": chat(n=2, temperature=0.7, seed=1, max_tokens=16),
    "trace_in_content": chat(trace="content"),
    "no_trace": chat(trace="none"),
    "system_and_parts": {
        "model": "demo",
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
        ],
        "max_tokens": 96,
    },
}


@pytest.mark.parametrize("case", CHAT_CASES)
def test_chat_completion_conforms(spec, base_url, case):
    """Guards against a non-streaming response the spec or the SDK's strict types reject."""
    body = CHAT_CASES[case]
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    raw = r.json()
    conforms(spec, "CreateChatCompletionResponse", raw, CHAT_EXTENSIONS)
    parsed = round_trips(ChatCompletion, raw)
    assert parsed.model == "demo"
    assert [c.index for c in parsed.choices] == list(range(body.get("n", 1)))
    assert all(c.finish_reason in ("stop", "length") for c in parsed.choices)
    assert all(isinstance(c.message.content, str) for c in parsed.choices)
    choice = parsed.choices[0]
    usage = parsed.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.completion_tokens <= body["max_tokens"] * body.get("n", 1)  # summed over choices
    if case == "cut_at_length":
        assert choice.finish_reason == "length"
    if case in ("searches", "system_and_parts", "trace_in_content", "no_trace"):
        assert choice.finish_reason == "stop" and ANSWER in choice.message.content
    if case == "no_trace":
        assert "search_trace" not in raw and choice.message.content == ANSWER


def test_every_chat_extension_is_one_the_spec_does_not_declare(spec, searched):
    """Guards against the extension list drifting from what we send: a searching answer
    carries every chat extension, and the spec declares none of them."""
    assert conforms(spec, "CreateChatCompletionResponse", searched, CHAT_EXTENSIONS) == (
        CHAT_EXTENSIONS
    )
    assert searched["usage"]["searches"] == len(searched["search_trace"]) >= 1


def test_sdk_parse_round_trips(client):
    """Guards against fields the SDK drops or misreads: its parse of our JSON must dump back to
    that JSON, extensions included (as `model_extra`)."""
    response = client.chat.completions.with_raw_response.create(**chat())
    raw = response.http_response.json()
    parsed = response.parse()
    assert isinstance(parsed, ChatCompletion)
    assert parsed.model_dump(mode="json", exclude_unset=True) == raw
    message = parsed.choices[0].message
    assert ANSWER in message.content and parsed.choices[0].finish_reason == "stop"
    reasoning = raw["choices"][0]["message"]["reasoning_content"]
    assert reasoning and message.model_extra["reasoning_content"] == reasoning
    assert parsed.usage.model_extra["searches"] >= 1


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_chunks_conform(spec, base_url, include_usage):
    """Guards against a chunk the spec or the SDK rejects: the role chunk, token chunks, the
    finish_reason chunk and (only when asked) the usage chunk."""
    body = {**chat(), "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    chunks = post_sse(base_url, "/v1/chat/completions", body)
    undeclared: set[str] = set()
    for chunk in chunks:
        undeclared |= conforms(spec, "CreateChatCompletionStreamResponse", chunk, CHUNK_EXTENSIONS)
        round_trips(ChatCompletionChunk, chunk)
    assert undeclared == (
        CHUNK_EXTENSIONS if include_usage else CHUNK_EXTENSIONS - USAGE_EXTENSIONS
    )
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is not None]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "stop"
    usage = [c for c in chunks if c.get("usage") is not None]
    if include_usage:
        assert usage == [chunks[-1]] and chunks[-1]["choices"] == []
        assert chunks[-2] is finals[0]
        assert usage[0]["usage"]["completion_tokens"] > 0
    else:
        assert usage == [] and chunks[-1] is finals[0]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert ANSWER in content


def test_chat_stream_with_two_choices_conforms(spec, base_url):
    """Guards against interleaved choices breaking the chunk shape: each index opens with its
    role chunk and closes with one finish_reason chunk, and usage (both runs) comes last."""
    body = chat(n=2, temperature=0.7, seed=1, max_tokens=16, stream=True,
                stream_options={"include_usage": True})  # fmt: skip
    chunks = post_sse(base_url, "/v1/chat/completions", body)
    for chunk in chunks:
        conforms(spec, "CreateChatCompletionStreamResponse", chunk, CHUNK_EXTENSIONS)
        round_trips(ChatCompletionChunk, chunk)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    for index in (0, 1):
        own = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert own[0]["delta"]["role"] == "assistant"
        assert [c["finish_reason"] is not None for c in own] == [False] * (len(own) - 1) + [True]


def test_sdk_stream_matches_the_raw_stream(client, base_url):
    """Guards against chunks the SDK's stream reader misparses: it must assemble the same
    (greedy, so repeatable) answer as the raw SSE frames."""
    body = {**chat(), "stream": True, "stream_options": {"include_usage": True}}
    raw = post_sse(base_url, "/v1/chat/completions", body)
    sdk = list(client.chat.completions.create(**body))
    fresh = {"id", "created"}  # per request
    assert [c.model_dump(mode="json", exclude_unset=True, exclude=fresh) for c in sdk] == [
        {k: v for k, v in c.items() if k not in fresh} for c in raw
    ]


# -- text completions -------------------------------------------------------------------------


@pytest.mark.parametrize("agent", [True, False])
def test_text_completion_conforms(spec, base_url, agent):
    """Guards against a /v1/completions response the spec or the SDK's strict types reject,
    for agent runs and plain decoding alike."""
    body = {"model": "demo", "prompt": QUESTION, "max_tokens": 24, "agent": agent}
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    raw = r.json()
    conforms(spec, "CreateCompletionResponse", raw, COMPLETION_EXTENSIONS)
    parsed = round_trips(Completion, raw)
    assert parsed.choices[0].finish_reason in ("stop", "length")
    assert parsed.usage is not None and 0 < parsed.usage.completion_tokens <= 24


def test_text_completion_stream_chunks_conform_but_for_a_null_finish_reason(spec, base_url):
    """Guards against stream chunks the spec rejects, with one deviation named rather than
    hidden: the spec gives streamed and plain completions one shape, whose finish_reason is
    not nullable, yet OpenAI and vLLM send null on every chunk but the last; so do we."""
    body = {"model": "demo", "prompt": QUESTION, "max_tokens": 24, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    chunks = post_sse(base_url, "/v1/completions", body)
    validator = spec.validator("CreateCompletionResponse")
    null_finish = 0
    for chunk in chunks:
        errors = list(validator.iter_errors(chunk))
        tolerated = [e for e in errors if e.instance is None and e.path[-1] == "finish_reason"]
        assert errors == tolerated, [f"{e.json_path}: {e.message}" for e in errors]
        null_finish += bool(tolerated)
        assert spec.undeclared("CreateCompletionResponse", chunk) <= COMPLETION_EXTENSIONS
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert null_finish == len(chunks) - 2  # every chunk before the finish_reason one


# -- models and errors ------------------------------------------------------------------------


def test_models_conform(spec, base_url, client):
    """Guards against a model list the spec, the SDK's strict types or `models.list()` reject."""
    r = httpx.get(f"{base_url}/v1/models", timeout=10)
    assert r.status_code == 200
    raw = r.json()
    assert conforms(spec, "ListModelsResponse", raw, MODEL_EXTENSIONS) == MODEL_EXTENSIONS
    assert [round_trips(Model, card).id for card in raw["data"]] == ["demo"]
    assert [m.id for m in client.models.list()] == ["demo"]


def request(base_url: str, method: str, path: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body)
    headers = {"content-type": "application/json"} if body is not None else {}
    return httpx.request(method, f"{base_url}{path}", content=content, headers=headers, timeout=30)


ERROR_CASES = {
    "bad_json": ("POST", "/v1/chat/completions", b'{"model": "demo", ', 400),
    "not_an_object": ("POST", "/v1/chat/completions", [1, 2], 400),
    "missing_model": ("POST", "/v1/chat/completions", {"messages": chat()["messages"]}, 400),
    "unknown_model": ("POST", "/v1/chat/completions", chat(model="gpt-nope"), 404),
    "unknown_model_streaming": (
        "POST", "/v1/chat/completions", chat(model="gpt-nope", stream=True), 404
    ),
    "empty_messages": ("POST", "/v1/chat/completions", {"model": "demo", "messages": []}, 400),
    "blank_user_message": ("POST", "/v1/chat/completions", chat("   "), 400),
    "bad_role": ("POST", "/v1/chat/completions",
                 {"model": "demo", "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    "temperature_out_of_range": ("POST", "/v1/chat/completions", chat(temperature=2.5), 400),
    "max_tokens_zero": ("POST", "/v1/chat/completions", chat(max_tokens=0), 400),
    "prompt_too_long": ("POST", "/v1/chat/completions", chat("born " * 3000), 400),
    "completion_empty_prompt": ("POST", "/v1/completions", {"model": "demo", "prompt": ""}, 400),
    "completion_prompt_too_long": (
        "POST", "/v1/completions", {"model": "demo", "prompt": "born " * 3000}, 400
    ),
    "retrieve_blank_query": ("POST", "/retrieve", {"queries": ["  "]}, 400),
    "unknown_route": ("GET", "/v1/nothing-here", None, 404),
    "wrong_method": ("GET", "/v1/chat/completions", None, 405),
    "stream_options_without_stream": (
        "POST", "/v1/chat/completions", chat(stream_options={"include_usage": True}), 400
    ),
    "completion_stream_options_without_stream": (
        "POST", "/v1/completions",
        {"model": "demo", "prompt": "born", "stream_options": {"include_usage": True}}, 400,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", ERROR_CASES)
def test_error_bodies_conform(spec, base_url, case):
    """Guards against an error body the spec rejects (or one that is not JSON at all), and
    against a client mistake answered with a 5xx."""
    method, path, body, status = ERROR_CASES[case]
    r = request(base_url, method, path, body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    raw = r.json()
    conforms(spec, "ErrorResponse", raw, set())
    assert set(raw["error"]) == {"message", "type", "param", "code"}
    assert raw["error"]["message"] and raw["error"]["type"] == "invalid_request_error"
    if case.startswith(("prompt_too_long", "completion_prompt_too_long")):
        assert raw["error"]["code"] == "context_length_exceeded"
    if case == "wrong_method":  # RFC 9110: a 405 says what the resource allows
        assert r.headers["allow"] == "POST"
    if "stream_options" in case:
        assert raw["error"]["param"] == "stream_options"


def test_unparsable_body_names_no_param(base_url):
    """Guards against a `param` that points nowhere: a body that is not JSON has no field."""
    r = request(base_url, "POST", "/v1/chat/completions", b'{"model": "demo", ')
    assert r.status_code == 400 and r.json()["error"]["param"] is None


def test_sdk_raises_typed_errors_carrying_our_body(client):
    """Guards against error bodies the SDK cannot map: the exception class follows the status,
    and its code/param/type are ours."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**chat("born " * 3000))
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"
    assert info.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(**chat(model="gpt-nope"), stream=True)
    assert info.value.code == "model_not_found" and info.value.param == "model"
