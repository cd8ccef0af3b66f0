"""Chat request options over a real uvicorn on the demo checkpoint: conversation history, `n`,
`trace`, `stop`, `tools`."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from live_server import serving

from service.chat import conversation
from service.protocol import ChatMessage

QUESTION = "Where was Sethna Drorpethwais born?"
ANSWER = "Krendeimpe"


@pytest.fixture(scope="module")
def url(demo_app, free_port):
    with serving(demo_app, free_port()) as base:
        yield base


def chat(url: str, **fields) -> dict:
    body = {"model": "demo", "messages": [{"role": "user", "content": QUESTION}], **fields}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def stream_chunks(url: str, **fields) -> list[dict]:
    body = {"model": "demo", "messages": [{"role": "user", "content": QUESTION}], "stream": True}
    body |= fields
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_history_gives_assistant_answers_not_traces(demo_app):
    """Guards against: a client that sends back a raw trace (trace "content") feeding the model
    its own documents as if the user wrote them, a system prompt being dropped, and the question
    being an earlier user message instead of the last."""
    ctx = demo_app.state.chat
    fmt = ctx.loop.fmt
    trace = f"{fmt.search_open}q{fmt.search_close}{fmt.answer_open}Velmora{fmt.answer_close}"
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Where is the bakery?"),
        ChatMessage(role="assistant", content=trace),
        ChatMessage(role="user", content=[{"type": "text", "text": QUESTION}]),
    ]
    question, turns, system = conversation(ctx, messages)
    assert question == QUESTION and system == "Be brief."
    assert turns == [("user", "Where is the bakery?"), ("assistant", "Velmora")]
    text = ctx.loop.engine.tokenizer.decode(ctx.loop.prompt_ids(question, turns, system))
    assert "Be brief." in text and "Assistant: Velmora" in text and fmt.search_open not in text
    assert text.rstrip().endswith(fmt.prompt(QUESTION).rstrip())


def test_n_choices_are_separate_runs(url):
    """Guards against: n silently ignored (one choice), choices sharing one run's state, usage
    counting only one run, and a stream that does not finish every choice."""
    body = chat(url, n=2, max_tokens=96)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(ANSWER in c["message"]["content"] for c in body["choices"])
    single = chat(url, max_tokens=96)
    assert body["usage"]["completion_tokens"] == 2 * single["usage"]["completion_tokens"]
    assert body["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
    assert body["usage"]["searches"] == 2 * single["usage"]["searches"]
    chunks = stream_chunks(url, n=2, max_tokens=96)
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["stop"]
        assert ANSWER in "".join(c["delta"].get("content", "") for c in mine)


def test_trace_option(url, demo_app):
    """Guards against: trace "none" still leaking documents, trace "content" losing where the
    answer is, and the default moving the trace out of reasoning_content."""
    fmt_default = chat(url, max_tokens=96)
    message = fmt_default["choices"][0]["message"]
    assert message["content"] == ANSWER and "Drorpethwais" in message["reasoning_content"]
    assert fmt_default["search_trace"][0]["passages"]
    hidden = chat(url, max_tokens=96, trace="none")
    assert hidden["choices"][0]["message"]["content"] == ANSWER
    assert hidden["choices"][0]["message"]["reasoning_content"] is None
    assert "search_trace" not in hidden
    raw = chat(url, max_tokens=96, trace="content")["choices"][0]["message"]
    assert raw["reasoning_content"] is None
    assert raw["content"].startswith(message["reasoning_content"][:20])
    fmt = demo_app.state.chat.loop.fmt
    assert raw["content"].endswith(f"{fmt.answer_open}{ANSWER}{fmt.answer_close}")
    assert fmt.search_open in raw["content"]
    streamed = stream_chunks(url, max_tokens=96, trace="none")
    assert not any(
        "reasoning_content" in c["choices"][0]["delta"] for c in streamed if c["choices"]
    )


def test_stop_ends_the_answer(url):
    """Guards against: stop ignored by the agent (OpenAI clients use it), a stop string leaking
    into content, and streaming and non-streaming cutting differently."""
    body = chat(url, max_tokens=96, stop=["dei"])
    assert body["choices"][0]["message"]["content"] == "Kren"
    assert body["choices"][0]["finish_reason"] == "stop"
    chunks = stream_chunks(url, max_tokens=96, stop="dei")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == (
        "Kren"
    )
    untouched = chat(url, max_tokens=96, stop=["Velmora"])
    assert untouched["choices"][0]["message"]["content"] == ANSWER
    one_long = chat(url, max_tokens=96, stop="Question:")  # a str, not a list of at most 4
    assert one_long["choices"][0]["message"]["content"] == ANSWER


@pytest.mark.parametrize(
    "field, value",
    [
        ("logprobs", True),
        ("top_logprobs", 2),
        ("response_format", {"type": "json_object"}),
        ("presence_penalty", 0.5),
        ("web_search_options", {}),
    ],
)
def test_what_cannot_be_honoured_gets_a_clear_400(url, field, value):
    """Guards against: a field asking for what this server cannot do being dropped, so the
    client gets an answer without it (`logprobs: true` answered with `"logprobs": null`, which
    the client then dereferences; a JSON format that was never enforced)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": QUESTION}], **{field: value}
        )
    assert err.value.body["param"] == field and err.value.body["message"]


def test_fields_that_ask_for_nothing_are_accepted(url):
    """Guards against: refusing the "off" values clients send by default (LangChain and others
    send `presence_penalty: 0`, `logprobs: false`) or fields that change no output."""
    body = chat(
        url, max_tokens=96, logprobs=False, top_logprobs=0, presence_penalty=0,
        frequency_penalty=0.0, response_format={"type": "text"}, store=False,
        metadata={"team": "search"}, service_tier="auto",
    )  # fmt: skip
    assert body["choices"][0]["message"]["content"] == ANSWER


def test_tools_get_a_clear_400(url):
    """Guards against: tool definitions silently ignored (the client would wait for tool calls
    that never come) or a 500."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    tool = {"type": "function", "function": {"name": "web_search", "parameters": {}}}
    with pytest.raises(openai.BadRequestError, match="search is built in") as err:
        client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": QUESTION}], tools=[tool]
        )
    assert err.value.body["param"] == "tools"
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "demo", "messages": [{"role": "user", "content": "hi"}], "n": 9},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"
