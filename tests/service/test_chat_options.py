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
    # each search names the choice whose run made it
    per_choice = [[s["query"] for s in body["search_trace"] if s["index"] == i] for i in (0, 1)]
    assert per_choice == [[s["query"] for s in single["search_trace"]]] * 2
    chunks = stream_chunks(url, n=2, max_tokens=96)
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["stop"]
        assert ANSWER in "".join(c["delta"].get("content", "") for c in mine)
        traced = [c for c in chunks if c.get("search_trace") and c["choices"][0]["index"] == i]
        assert [s["index"] for c in traced for s in c["search_trace"]] == [i] * len(per_choice[i])


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


@pytest.mark.parametrize(
    "field, value",
    [
        ("guided_choice", ["a", "b"]),
        ("structured_outputs", {"choice": ["a", "b"]}),
        ("repetition_penalty", 1.5),
        ("min_p", 0.1),
        ("min_tokens", 50),
        ("ignore_eos", True),
        ("bad_words", ["Krendeimpe"]),
        ("allowed_token_ids", [1, 2]),
        ("stop_token_ids", [5]),
        ("echo", True),
        ("chat_template", "{{ messages }}"),
        ("continue_final_message", True),
        ("function_call", {"name": "web_search"}),
        ("tool_choice", "required"),
    ],
)
def test_vllm_extensions_that_cannot_be_honoured_get_a_clear_400(url, field, value):
    """Guards against: vLLM's sampling and chat extensions (which completions already refused)
    answered on chat as if they were not there; and `tool_choice` forcing a tool call with no
    tools (OpenAI and vLLM refuse it) answered with a plain answer."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": QUESTION}],
            extra_body={field: value},
        )  # fmt: skip
    assert err.value.body["param"] == field and err.value.body["message"]


@pytest.mark.parametrize(
    "fields, param, says",
    [
        ({"logit_bias": {"²": 1}}, "logit_bias", "token ids"),  # a digit to isdigit, not to int
        ({"logit_bias": {"9": 1, "09": 2}}, "logit_bias", "one token id"),
        ({"top_k": -2}, "top_k", "passages per search"),  # -1 and 0 are vLLM's "off"
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
         "messages.0.content.0.text", "valid string"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"stop": "x" * 2000}, "stop", "at most 1024 characters"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages.0.content.0.type", "'image_url' are not supported"),
        ({}, None, "no body"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content",
         "not valid Unicode"),
    ],
)  # fmt: skip
def test_bad_fields_are_named_and_explained(url, fields, param, says):
    """Guards against: a 500 for a logit_bias key `int` cannot read; and 400s that point at a
    pydantic union branch (`stop.str`, `messages.0.content.str`: "Input should be a valid
    string") instead of the field and the reason."""
    body = {"model": "demo", "messages": [{"role": "user", "content": QUESTION}], **fields}
    raw = json.dumps(body).encode() if fields else b""  # ASCII escapes: a lone surrogate travels
    response = httpx.post(
        f"{url}/v1/chat/completions", content=raw, timeout=30,
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert not error["message"].startswith("Value error")


def test_usage_total_is_prompt_plus_completion_and_models_retrieve(url):
    """Guards against: `total_tokens` counting the injected documents too, which OpenAI defines
    as prompt + completion (usage aggregators add them up); nullable fields (`n`, `stream`)
    refused when a client sends null; and `client.models.retrieve` answered with a 404."""
    body = chat(url, max_tokens=96, n=None, stream=None)
    usage = body["usage"]
    assert usage["retrieved_tokens"] > 0 and body["choices"][0]["message"]["content"] == ANSWER
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    card = client.models.retrieve("demo")
    assert card.id == "demo" and card.object == "model"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-nope")
    assert err.value.body["code"] == "model_not_found"


def test_fields_that_ask_for_nothing_are_accepted(url):
    """Guards against: refusing the "off" values clients send by default (LangChain and others
    send `presence_penalty: 0`, `logprobs: false`) or fields that change no output."""
    body = chat(
        url, max_tokens=96, logprobs=False, top_logprobs=0, presence_penalty=0,
        frequency_penalty=0.0, response_format={"type": "text"}, store=False,
        metadata={"team": "search"}, service_tier="auto", tool_choice="none",
        repetition_penalty=1.0, min_p=0, ignore_eos=False, add_generation_prompt=True,
        top_k=-1, chat_template_kwargs={"enable_thinking": False},
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
