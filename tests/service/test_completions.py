"""`POST /v1/completions` over a real uvicorn serving the demo checkpoint, driven by the official
`openai` client (every test streaming and not) and by raw httpx for vLLM's wire details."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.chat import undecided_tail as _undecided

DEMO = Path(__file__).resolve().parents[2] / "artifacts" / "demo"

# the generated world and index under DEMO are built by the session fixture when missing
pytestmark = pytest.mark.usefixtures("demo_artifacts")


@pytest.fixture
def base_url(demo_app, serve_app) -> str:
    return serve_app(demo_app)


@pytest.fixture
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def question() -> str:
    return json.loads((DEMO / "world" / "test.jsonl").read_text().splitlines()[0])["question"]


@pytest.fixture(scope="module")
def prompt(demo_app, question) -> list[int]:
    return demo_app.state.chat.loop.prompt_ids(question)


def plain(client, prompt, stream=False, **extra):
    """A plain-decoding completion through the SDK; streaming ones come back as a chunk list."""
    body = {"agent": False, "return_token_ids": True} | extra.pop("extra_body", {})
    r = client.completions.create(
        model="demo", prompt=prompt, max_tokens=24, stream=stream, extra_body=body, **extra
    )
    return list(r) if stream else r


def joined(chunks) -> tuple[str, list[int]]:
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    ids = [i for c in chunks if c.choices for i in (c.choices[0].model_extra["token_ids"] or [])]
    return text, ids


def test_plain_completion_parses_with_the_official_client(client, prompt):
    """Guards against completions the OpenAI SDK (or a vLLM client) cannot read: object type,
    text, finish and stop reasons, token ids with return_token_ids, usage; the stream carries
    the same text and ids, prompt ids on its first chunk only, and a final usage chunk."""
    r = plain(client, prompt)
    choice = r.choices[0]
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.text, str)
    extra = choice.model_extra
    assert extra["prompt_token_ids"] == prompt and "stop_reason" in extra
    assert len(extra["token_ids"]) == r.usage.completion_tokens > 0
    assert r.usage.prompt_tokens == len(prompt)

    chunks = plain(client, prompt, stream=True, stream_options={"include_usage": True})
    body = [c for c in chunks if c.choices]
    assert joined(chunks) == (choice.text, extra["token_ids"])
    assert body[0].choices[0].model_extra["prompt_token_ids"] == prompt
    assert all(c.choices[0].model_extra["prompt_token_ids"] is None for c in body[1:])
    assert [c.choices[0].finish_reason for c in body] == [None] * (len(body) - 1) + [
        choice.finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
        extra["token_ids"]
    )


def test_stream_frames_follow_vllm_wire_format(base_url, prompt):
    """Guards against frames a vLLM client would not expect: `data:` JSON frames with vLLM's
    choice fields, no usage key before the usage chunk, and [DONE] last."""
    body = {"model": "demo", "prompt": prompt, "max_tokens": 5, "stream": True, "agent": False}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    keys = {"index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_token_ids"}
    assert all(set(c["choices"][0]) == keys | {"token_ids"} for c in chunks)
    assert all(c["choices"][0]["token_ids"] is None for c in chunks)  # not asked for


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_is_cut_from_the_text_and_reported(client, prompt, demo_app, stream):
    """Guards against a stop string leaking into the text (even briefly, while streaming) and
    against lost token ids: the text ends before the stop string, stop_reason names it, and
    token_ids still hold every sampled token, the one completing the stop included."""
    free = plain(client, prompt, extra_body={"skip_special_tokens": False})
    full, free_ids = free.choices[0].text, free.choices[0].model_extra["token_ids"]
    stop = " the birthplace"  # spans two tokens: " the" must wait until " birthplace" decides
    assert stop in full, full
    r = plain(client, prompt, stream, stop=[stop], extra_body={"skip_special_tokens": False})
    if stream:
        assert all(" the" not in c.choices[0].text for c in r if c.choices)
        text, ids = joined(r)
        last = r[-1].choices[0]
    else:
        text, ids, last = r.choices[0].text, r.choices[0].model_extra["token_ids"], r.choices[0]
    assert text == full[: full.index(stop)]
    assert last.finish_reason == "stop" and last.model_extra["stop_reason"] == stop
    tok = demo_app.state.chat.loop.engine.tokenizer
    assert ids == free_ids[: len(ids)] and tok.decode(ids).endswith(stop)


@pytest.mark.parametrize("stream", [False, True])
def test_held_back_text_is_released_when_no_stop_follows(client, prompt, stream):
    """Guards against swallowing text that only looked like the start of a stop string: with
    a stop that never completes, the text is the same as without it."""
    free = plain(client, prompt).choices[0].text
    r = plain(client, prompt, stream, stop=[" the birthplace!", "zz"])
    text = joined(r)[0] if stream else r.choices[0].text
    assert text == free


@pytest.mark.parametrize("stream", [False, True])
def test_include_stop_str_and_special_tokens(client, prompt, stream):
    """Guards against ignoring vLLM's output options: include_stop_str_in_output keeps the
    stop string (and nothing after it), skip_special_tokens=false shows the tags."""
    extra = {"include_stop_str_in_output": True, "skip_special_tokens": False}
    r = plain(client, prompt, stream, stop=[" birthplac"], extra_body=extra)
    text = joined(r)[0] if stream else r.choices[0].text
    assert text.startswith("<think>") and text.endswith(" birthplac")
    hidden = plain(client, prompt, stream, stop=[" birthplac"])
    hidden_text = joined(hidden)[0] if stream else hidden.choices[0].text
    assert "<think>" not in hidden_text and hidden_text == text[len("<think>") : -len(" birthplac")]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_token_id_is_reported_and_its_text_left_out(client, prompt, demo_app, stream):
    """Guards against vLLM's stop_token_ids semantics: the id ends the completion, is the
    stop_reason, stays in token_ids, and its text stays out of `text`."""
    tok = demo_app.state.chat.loop.engine.tokenizer
    close = tok.token_id(demo_app.state.chat.loop.fmt.think_close)
    extra = {"stop_token_ids": [close], "skip_special_tokens": False}
    r = plain(client, prompt, stream, extra_body=extra)
    if stream:
        text, ids = joined(r)
        last = [c for c in r if c.choices][-1].choices[0]
    else:
        last = r.choices[0]
        text, ids = last.text, last.model_extra["token_ids"]
    assert last.finish_reason == "stop" and last.model_extra["stop_reason"] == close
    assert ids[-1] == close and "</think>" not in text and text.startswith("<think>")


@pytest.mark.parametrize("stream", [False, True])
def test_agent_completion_runs_the_loop(client, demo_app, question, stream):
    """Guards against the default (`agent: true`) not running the agent: the prompt goes
    through the loop, `text` is the answer, the trace is in the extensions."""
    text_prompt = demo_app.state.chat.loop.fmt.prompt(question)
    r = client.completions.create(model="demo", prompt=text_prompt, max_tokens=160, stream=stream)
    if not stream:
        choice = r.choices[0]
        assert "<search>" in choice.model_extra["reasoning_content"]
        assert r.model_extra["search_trace"][0]["passages"]
        assert r.usage.model_extra["searches"] >= 1
        return
    chunks = list(r)
    text = "".join(c.choices[0].text for c in chunks)
    reasoning = "".join(c.choices[0].model_extra.get("reasoning_content") or "" for c in chunks)
    done = client.completions.create(model="demo", prompt=text_prompt, max_tokens=160)
    assert text == done.choices[0].text and "<documents>" in reasoning
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason
    assert chunks[-1].model_extra["search_trace"]


STOPS_65 = [f"s{i}" for i in range(65)]  # each token is matched against every stop string


@pytest.mark.parametrize(
    "change, status, param, code",
    [
        ({"n": 2}, 400, "n", None),
        ({"prompt": [5, 99999]}, 400, "prompt", None),
        ({"prompt": [-1]}, 400, "prompt", None),
        ({"prompt": list(range(3, 40)) * 60}, 400, "prompt", "context_length_exceeded"),
        ({"prompt": ["one", "two"]}, 400, "prompt", None),
        ({"prompt": ""}, 400, "prompt", None),
        ({"stop": ["x"]}, 400, "stop", None),  # agent mode has its own stops
        ({"logprobs": 2}, 400, "logprobs", None),
        ({"best_of": 2}, 400, "best_of", None),  # asked for and not done: no silent ignoring
        ({"frequency_penalty": 0.5}, 400, "frequency_penalty", None),
        ({"suffix": " and then"}, 400, "suffix", None),
        ({"extra_body": {"guided_json": {"type": "object"}}}, 400, "guided_json", None),
        ({"extra_body": {"agent": False, "top_k": 40}}, 400, "top_k", None),  # not sampling
        ({"extra_body": {"agent": False, "max_searches": 2}}, 400, "max_searches", None),
        ({"extra_body": {"agent": False, "min_p": 0.2}}, 400, "min_p", None),
        ({"extra_body": {"agent": False, "ignore_eos": True}}, 400, "ignore_eos", None),
        ({"extra_body": {"agent": False, "allowed_token_ids": [3]}}, 400, "allowed_token_ids",
         None),
        ({"stop": STOPS_65, "extra_body": {"agent": False}}, 400, "stop", None),  # bounded work
        ({"logit_bias": {"①": 1}}, 400, "logit_bias", None),
        ({"max_tokens": 0}, 400, "max_tokens", None),
        ({"logit_bias": {"seven": 1}}, 400, "logit_bias", None),
        ({"logit_bias": {"7": 100.5}}, 400, "logit_bias", None),
        ({"logit_bias": {"99999": 1}}, 400, "logit_bias", None),  # beyond the vocabulary
        ({"model": "other"}, 404, "model", "model_not_found"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_get_openai_errors(client, change, status, param, code, stream):
    """Guards against client mistakes becoming 500s or odd bodies, streaming or not: an HTTP
    error before any byte, in OpenAI's error shape, naming the field."""
    args = {"model": "demo", "prompt": "question: hello", "max_tokens": 4} | change
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(stream=stream, **args)
    assert err.value.status_code == status
    error = err.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)


@pytest.mark.parametrize("stream", [False, True])
def test_logit_bias_steers_plain_decoding_and_the_agent(client, prompt, demo_app, stream):
    """Guards against logit_bias accepted and ignored (vLLM and OpenAI honour it): +100 on one
    token makes greedy decoding write only that token, and in agent mode (chat too) a -100 on
    the search tag keeps the policy from ever searching."""
    tok = demo_app.state.chat.loop.engine.tokenizer
    forced = tok.encode(" Velmora")[0]
    chunks = plain(client, prompt, stream, extra_body={"logit_bias": {str(forced): 100}})
    ids = joined(chunks)[1] if stream else chunks.choices[0].model_extra["token_ids"]
    assert ids == [forced] * 24
    search = str(tok.token_id("<search>"))
    searched = client.completions.create(model="demo", prompt=prompt, max_tokens=64)
    assert searched.usage.model_extra["searches"] >= 1
    blind = client.completions.create(
        model="demo", prompt=prompt, max_tokens=64, logit_bias={search: -100}
    )
    assert blind.usage.model_extra["searches"] == 0 and "<search>" not in blind.choices[0].text
    chat = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Where was Gal Borin born?"}],
        max_tokens=64, logit_bias={search: -100},
    )  # fmt: skip
    assert chat.usage.model_extra["searches"] == 0


def test_undecided_tail_is_the_longest_stop_prefix():
    """Guards against holding back too little (a stop string leaks) or too much (text waits
    for nothing): only a tail that can still grow into a stop string is held."""
    assert _undecided("say the bir", (" the birthplace",)) == len(" the bir")
    assert _undecided("say the", (" the birthplace", "the end")) == len(" the")
    assert _undecided("say", (" the birthplace",)) == 0
    assert _undecided("ab", ("abc",)) == 2
    assert _undecided("abc", ("abc",)) == 0  # a whole stop string is the engine's business
    assert _undecided("x", ()) == 0


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.text(alphabet="ab ", max_size=4), max_size=12),
    stops=st.lists(st.text(alphabet="ab ", min_size=1, max_size=6), max_size=4).map(tuple),
)
def test_bounded_tail_search_equals_the_full_one(pieces, stops):
    """Guards against the streaming bound (only the text held back before, plus the new text,
    can start a stop string) changing what is held: it must only save work, which is what keeps
    many stop strings from stalling the event loop per token."""
    text, sent = "", 0
    for piece in pieces:
        text += piece
        full = _undecided(text, stops)
        assert _undecided(text, stops, len(text) - sent) == full
        sent = len(text) - full


@pytest.mark.parametrize("stream", [False, True])
def test_plain_decoding_stops_at_the_server_context_limit(serve_app, stream):
    """Guards against plain decoding (agent: false) ignoring the server's max_context: a
    50-token prompt with max_tokens 100 under a 64-token limit generated 100 tokens (the agent
    path stopped at 64)."""
    from service.app import create_app
    from service.settings import Settings

    app = create_app(
        Settings(model=DEMO / "sft", index=DEMO / "index", served_model_name="demo", max_context=64)
    )
    client = openai.OpenAI(base_url=f"{serve_app(app)}/v1", api_key="unused", max_retries=0)
    tok = app.state.chat.loop.engine.tokenizer
    prompt = (tok.encode(" the painter was born in Velmora") * 10)[:50]
    eos = str(tok.eos_id)
    r = client.completions.create(
        model="demo", prompt=prompt, max_tokens=100, stream=stream, logit_bias={eos: -100},
        extra_body={"agent": False, "return_token_ids": True},
    )  # fmt: skip
    chunks = list(r) if stream else [r]
    ids = [i for c in chunks if c.choices for i in c.choices[0].model_extra["token_ids"] or []]
    assert len(ids) == 64 - 50
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
