"""OpenAIEngine over real HTTP.

Against our own server running the demo checkpoint (`/v1/completions` with `agent: false` stands
in for vLLM): token-exact parity with TransformersEngine called directly, for single calls and
for whole agent runs. Against a replay server speaking vLLM's wire format: what our server cannot
show (chunks without token_ids, SGLang's field names, errors, a server that dies or stalls). And
the CLI that puts the engine behind the service.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import socket
import socketserver
import subprocess
import sys
import threading
import time
import warnings
from contextlib import aclosing
from pathlib import Path

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from agent.engine import SamplingParams, StopSpec, TokenChunk
from agent.openai_engine import (
    EngineConnectionError,
    EngineHTTPError,
    EngineProtocolError,
    EngineTimeoutError,
    OpenAIEngine,
)

DEMO = Path(__file__).resolve().parents[2] / "artifacts" / "demo"

# the generated world and index under DEMO are built by the session fixture when missing
pytestmark = pytest.mark.usefixtures("demo_artifacts")
GREEDY = SamplingParams(max_tokens=40)


@pytest.fixture
def demo_url(demo_app, serve_app) -> str:
    return serve_app(demo_app)


@pytest.fixture(scope="module")
def tok(demo_app):
    return demo_app.state.chat.loop.engine.tokenizer


@pytest.fixture(scope="module")
def reference(tok):
    """The same checkpoint in-process, called directly."""
    from agent.hf_engine import TransformersEngine

    return TransformersEngine(DEMO / "sft", tok, device="cpu")


@pytest.fixture(scope="module")
def questions() -> list[str]:
    rows = [json.loads(line) for line in (DEMO / "world" / "test.jsonl").read_text().splitlines()]
    return [r["question"] for r in rows[:2]]


def remote(url: str, tok, **kw) -> OpenAIEngine:
    """An OpenAIEngine on our server: `agent: false` asks for plain decoding."""
    return OpenAIEngine(url, tok, "demo", extra_body={"agent": False}, **kw)


async def collect(engine, ids, params=GREEDY, stop=StopSpec()) -> tuple[list[int], TokenChunk]:
    out: list[int] = []
    last = TokenChunk([])
    async with aclosing(engine.generate(ids, params, stop)) as chunks:
        async for chunk in chunks:
            out += chunk.ids
            last = chunk
    return out, last


def run_both(reference, url, tok, prompt, stop, params=GREEDY):
    async def go():
        engine = remote(url, tok)
        try:
            got = await collect(engine, prompt, params, stop)
        finally:
            await engine.aclose()
        assert engine.stats.fallback_chunks == 0, "our server returns token ids"
        return await collect(reference, prompt, params, stop), got

    return asyncio.run(go())


def finish(chunk: TokenChunk) -> tuple:
    return chunk.finish_reason, chunk.stop_token, chunk.stop_str


# -- (1) token-exact parity with the in-process engine -------------------------------------------


def test_greedy_ids_match_the_in_process_engine(demo_app, demo_url, tok, reference, questions):
    """Guards against the remote path changing what the model says: with greedy sampling the
    ids through HTTP equal TransformersEngine's, free-running, with stop token ids and with a
    stop string that is a whole (special) token's text."""
    fmt = demo_app.state.chat.loop.fmt
    stops = [
        StopSpec(),
        StopSpec(frozenset({tok.token_id(fmt.search_close), tok.token_id(fmt.answer_close)})),
        StopSpec(strings=(fmt.think_close, "zzz-never")),
    ]
    for question in questions:
        prompt = demo_app.state.chat.loop.prompt_ids(question)
        for stop in stops:
            (want, want_end), (got, got_end) = run_both(reference, demo_url, tok, prompt, stop)
            assert got == want
            assert finish(got_end) == finish(want_end)
        assert want_end.finish_reason == "stop" and want_end.stop_str == fmt.think_close


def test_stop_string_ending_inside_a_token(demo_app, demo_url, tok, reference, questions):
    """Guards against a stop string that ends inside a token losing or cutting ids: the token
    that completes it is emitted whole by both engines, and the match is reported as stop_str."""
    prompt = demo_app.state.chat.loop.prompt_ids(questions[0])
    free, _ = asyncio.run(collect(reference, prompt))
    for k in range(2, len(free)):
        text = tok.decode([free[k]])
        head = text[:-1]  # a proper prefix of this token's text
        if len(head.strip()) >= 3 and head not in tok.decode(free[:k]) and "<" not in text:
            break
    else:
        pytest.fail("no multi-character token in the demo output")
    (want, want_end), (got, got_end) = run_both(
        reference, demo_url, tok, prompt, StopSpec(strings=(head,))
    )
    assert want == free[: k + 1] and got == want
    assert finish(got_end) == finish(want_end) == ("stop", None, head)


# -- (2) a whole agent run ------------------------------------------------------------------------


def test_agent_loop_trajectory_matches_the_in_process_engine(
    demo_app, demo_url, tok, reference, questions
):
    """Guards against drift over several rounds (documents injected between calls): the agent
    loop through OpenAIEngine leaves exactly the trajectory it leaves through TransformersEngine."""
    from agent.events import Finished
    from agent.loop import AgentLoop, RunParams
    from retrieval.index import load_index

    index = load_index(DEMO / "index")
    fmt, limits = demo_app.state.chat.loop.fmt, demo_app.state.chat.loop.limits

    async def trajectory(engine, question):
        loop = AgentLoop(engine, index, fmt, limits)
        events = [e async for e in loop.run(loop.prompt_ids(question), RunParams(max_tokens=160))]
        return next(e for e in events if isinstance(e, Finished))

    async def go():
        engine = remote(demo_url, tok)
        try:
            return [
                (await trajectory(reference, q), await trajectory(engine, q)) for q in questions
            ]
        finally:
            await engine.aclose()

    searched = 0
    for want, got in asyncio.run(go()):
        assert got.trajectory.completion_ids == want.trajectory.completion_ids
        assert got.trajectory.env_mask == want.trajectory.env_mask
        assert [s.query for s in got.trajectory.searches] == [
            s.query for s in want.trajectory.searches
        ]
        assert (got.reason, got.trajectory.answer) == (want.reason, want.trajectory.answer)
        assert got.usage == want.usage
        searched += len(want.trajectory.searches)
    assert searched, "the demo policy should search"


# -- (3) vLLM's wire format, replayed -------------------------------------------------------------

# Frames of a streamed vLLM /v1/completions response, reconstructed from vLLM's protocol
# definitions (vllm/entrypoints/openai/completion/protocol.py: CompletionStreamResponse and
# CompletionResponseStreamChoice, dumped with exclude_unset=True by completion/serving.py; the
# usage chunk dumped with exclude_none=True). They were not recorded from a live vLLM: there is
# no GPU here to run one. Token ids and texts are the demo tokenizer's; the third chunk carries
# two tokens, as with vLLM's --stream-interval; the stop is </search> (id 4) from stop_token_ids.
PROMPT = [1, 426, 36, 733, 273, 302, 467, 297, 810, 1433, 916, 94, 418, 272, 41, 231]
WITH_IDS = [
    'data: {"id":"cmpl-5d3f0b6c2a8e4c1f9b7a6d5e4c3b2a10","object":"text_completion","created":1767225600,"model":"demo","choices":[{"index":0,"text":"<think>","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":[1,426,36,733,273,302,467,297,810,1433,916,94,418,272,41,231],"token_ids":[9]}]}',  # noqa: E501
    'data: {"id":"cmpl-5d3f0b6c2a8e4c1f9b7a6d5e4c3b2a10","object":"text_completion","created":1767225600,"model":"demo","choices":[{"index":0,"text":" I","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":[288]}]}',  # noqa: E501
    'data: {"id":"cmpl-5d3f0b6c2a8e4c1f9b7a6d5e4c3b2a10","object":"text_completion","created":1767225600,"model":"demo","choices":[{"index":0,"text":" need the","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":[424,302]}]}',  # noqa: E501
    'data: {"id":"cmpl-5d3f0b6c2a8e4c1f9b7a6d5e4c3b2a10","object":"text_completion","created":1767225600,"model":"demo","choices":[{"index":0,"text":" birthplace","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":[467]}]}',  # noqa: E501
    'data: {"id":"cmpl-5d3f0b6c2a8e4c1f9b7a6d5e4c3b2a10","object":"text_completion","created":1767225600,"model":"demo","choices":[{"index":0,"text":"</think>","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":[10]}]}',  # noqa: E501
    'data: {"id":"cmpl-5d3f0b6c2a8e4c1f9b7a6d5e4c3b2a10","object":"text_completion","created":1767225600,"model":"demo","choices":[{"index":0,"text":"<search>","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":[3]}]}',  # noqa: E501
    'data: {"id":"cmpl-5d3f0b6c2a8e4c1f9b7a6d5e4c3b2a10","object":"text_completion","created":1767225600,"model":"demo","choices":[{"index":0,"text":" Amfal","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":[810,1433]}]}',  # noqa: E501
    'data: {"id":"cmpl-5d3f0b6c2a8e4c1f9b7a6d5e4c3b2a10","object":"text_completion","created":1767225600,"model":"demo","choices":[{"index":0,"text":"</search>","logprobs":null,"finish_reason":"stop","stop_reason":4,"prompt_token_ids":null,"token_ids":[4]}]}',  # noqa: E501
    'data: {"id":"cmpl-5d3f0b6c2a8e4c1f9b7a6d5e4c3b2a10","object":"text_completion","created":1767225600,"model":"demo","choices":[],"usage":{"prompt_tokens":16,"total_tokens":26,"completion_tokens":10}}',  # noqa: E501
    "data: [DONE]",
]
SAMPLED = [[9], [288], [424, 302], [467], [10], [3], [810, 1433], [4]]


def without_ids(frame: str) -> str:
    """The same frame from a vLLM without return_token_ids: no id fields in the choices."""
    if not frame.startswith("data: {"):
        return frame
    chunk = json.loads(frame[len("data: ") :])
    for choice in chunk["choices"]:
        del choice["prompt_token_ids"], choice["token_ids"]
    return "data: " + json.dumps(chunk, separators=(",", ":"))


# A stop string that ends inside a token: vLLM cuts the text after the match (with
# include_stop_str_in_output) but returns the whole token's id (467 is " birthplace").
INSIDE_TOKEN = 'data: {"id":"cmpl-0a1b","object":"text_completion","created":1767225600,"model":"demo","choices":[{"index":0,"text":" birthplac","logprobs":null,"finish_reason":"stop","stop_reason":" birthplac","prompt_token_ids":null,"token_ids":[467]}]}'  # noqa: E501


class Replay:
    """A real HTTP server (starlette under uvicorn) answering /v1/completions with fixed SSE
    frames; it records request bodies and headers and whether the client went away."""

    def __init__(self, frames: list[str], delay_s: float = 0.0, die_after: int | None = None):
        self.frames = frames
        self.delay_s = delay_s
        self.die_after = die_after
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.sent = 0
        self.gone = threading.Event()  # the response generator ended without finishing
        self.app = Starlette(routes=[Route("/v1/completions", self.completions, methods=["POST"])])

    async def completions(self, request: Request):
        self.bodies.append(await request.json())
        self.headers.append(dict(request.headers))

        async def body():
            finished = False
            try:
                for n, frame in enumerate(self.frames):
                    if self.die_after is not None and n == self.die_after:
                        raise RuntimeError("replay server dies mid-stream")
                    await asyncio.sleep(self.delay_s)
                    yield frame + "\n\n"
                    self.sent += 1
                finished = True
            finally:
                if not finished:
                    self.gone.set()

        return StreamingResponse(body(), media_type="text/event-stream")


def replay_run(serve_app, replay, tok, stop=StopSpec(), params=GREEDY, **kw):
    url = serve_app(replay.app)

    async def go():
        engine = OpenAIEngine(url, tok, "demo", **kw)
        chunks = []
        try:
            async with aclosing(engine.generate(PROMPT, params, stop)) as it:
                async for chunk in it:
                    chunks.append(chunk)
        finally:
            await engine.aclose()
        return engine, chunks

    return asyncio.run(go())


def test_replayed_vllm_stream_with_token_ids(serve_app, tok):
    """Guards against misreading vLLM's stream: every chunk's ids are yielded as sent (two-token
    chunks included), the usage chunk is skipped, stop_reason 4 becomes stop_token 4, and the
    request asks for exactly what the engine relies on."""
    replay = Replay(WITH_IDS)
    stop = StopSpec(frozenset({4, 8}), ("</answer>",))
    engine, chunks = replay_run(serve_app, replay, tok, stop, api_key="sk-test")
    assert [c.ids for c in chunks] == SAMPLED
    assert finish(chunks[-1]) == ("stop", 4, None)
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert engine.stats.fallback_chunks == 0
    body = replay.bodies[0]
    assert body["prompt"] == PROMPT and body["model"] == "demo" and body["stream"] is True
    assert body["stop_token_ids"] == [tok.eos_id, 4, 8] and body["stop"] == ["</answer>"]
    assert body["include_stop_str_in_output"] is True and body["skip_special_tokens"] is False
    assert body["return_token_ids"] is True and body["max_tokens"] == GREEDY.max_tokens
    assert body["temperature"] == 0.0 and "seed" not in body and "logit_bias" not in body
    assert replay.headers[0]["authorization"] == "Bearer sk-test"


def test_banned_ids_go_to_the_server_as_logit_bias(serve_app, tok):
    """Guards against Retro-Search rollouts on vLLM taking the path they must not: banned ids
    are sent as OpenAI's logit_bias of -100 (a ban in vLLM), keyed by the id as a string."""
    replay = Replay(WITH_IDS)
    params = SamplingParams(max_tokens=8, banned_ids=frozenset({5, 17}))
    replay_run(serve_app, replay, tok, params=params)
    assert replay.bodies[0]["logit_bias"] == {"5": -100, "17": -100}


def test_a_requests_logit_bias_goes_to_the_server_with_the_bans_on_top(serve_app, tok):
    """Guards against a client's logit_bias dropped on the way to vLLM, or overriding a ban."""
    replay = Replay(WITH_IDS)
    params = SamplingParams(
        max_tokens=8, logit_bias=((5, 30.0), (9, -2.5)), banned_ids=frozenset({5})
    )
    replay_run(serve_app, replay, tok, params=params)
    assert replay.bodies[0]["logit_bias"] == {"5": -100, "9": -2.5}


def test_replayed_stream_without_token_ids_falls_back_to_retokenizing(serve_app, tok):
    """Guards against a server without return_token_ids breaking the engine: the text of each
    chunk is re-tokenized (here it happens to give the sampled ids) and counted as fallback."""
    frames = [without_ids(f) for f in WITH_IDS]
    assert frames[1].endswith('"finish_reason":null,"stop_reason":null}]}')
    engine, chunks = replay_run(serve_app, Replay(frames), tok)
    assert [c.ids for c in chunks] == SAMPLED
    assert finish(chunks[-1]) == ("stop", 4, None)
    assert engine.stats.fallback_chunks == len(SAMPLED)


def sglang_frame(text: str, finish: str | None = None, matched=None) -> str:
    """An SGLang /v1/completions stream frame: no token ids; `matched_stop` names the stop."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if finish is not None:
        choice["matched_stop"] = matched
    return "data: " + json.dumps({"id": "1", "object": "text_completion", "choices": [choice]})


@pytest.mark.parametrize("matched", [" born", 4])
def test_a_stop_the_server_trimmed_from_its_text_is_put_back(serve_app, tok, matched):
    """Guards against SGLang losing every closing tag: it trims a matched stop string (and a
    matched stop token) from its text unless asked not to, so re-tokenized trajectories lacked
    the tag the model wrote and the next round's context was malformed."""
    frames = [sglang_frame(" Gal Borin"), sglang_frame(" was", "stop", matched), "data: [DONE]"]
    replay = Replay(frames)
    stop = StopSpec(frozenset({4}), (" born",))
    _, chunks = replay_run(serve_app, replay, tok, stop)
    assert replay.bodies[0]["no_stop_trim"] is True  # SGLang's switch; vLLM ignores it
    ids = [i for c in chunks for i in c.ids]
    trimmed = tok.encode(" born") if isinstance(matched, str) else [matched]
    assert ids == tok.encode(" Gal Borin") + tok.encode(" was") + trimmed
    assert finish(chunks[-1])[0] == "stop"
    # a server that kept the stop in its text (no_stop_trim honoured) gets nothing added
    kept = [sglang_frame(" Gal Borin"), sglang_frame(" was born", "stop", " born"), "data: [DONE]"]
    _, chunks = replay_run(serve_app, Replay(kept), tok, stop)
    assert [i for c in chunks for i in c.ids] == tok.encode(" Gal Borin") + tok.encode(" was born")


def test_fallback_is_not_token_exact_when_a_stop_string_ends_inside_a_token(serve_app, tok):
    """Documents the fallback's limit: with token_ids the whole stopping token (467) comes back;
    re-tokenizing the cut text " birthplac" gives other ids. Both report the stop string."""
    frames = [INSIDE_TOKEN, "data: [DONE]"]
    _, exact = replay_run(serve_app, Replay(frames), tok)
    engine, approx = replay_run(serve_app, Replay([without_ids(f) for f in frames]), tok)
    assert exact[-1].ids == [467] and approx[-1].ids == tok.encode(" birthplac") != [467]
    assert finish(exact[-1]) == finish(approx[-1]) == ("stop", None, " birthplac")
    assert engine.stats.fallback_chunks == 1


@pytest.mark.parametrize(
    "choice, expected",
    [
        ({"text": "<|eos|>", "token_ids": [2], "finish_reason": "stop", "stop_reason": None},
         ("stop", 2, None)),  # vLLM reports no stop_reason for EOS
        ({"text": " the", "token_ids": [302], "finish_reason": "length", "stop_reason": None},
         ("length", None, None)),
        ({"text": "</answer>", "finish_reason": "stop", "matched_stop": 8},
         ("stop", 8, None)),  # SGLang's name for stop_reason
        ({"text": "</answer>", "finish_reason": "stop", "matched_stop": "</answer>"},
         ("stop", None, "</answer>")),
    ],
)  # fmt: skip
def test_finish_mapping(serve_app, tok, choice, expected):
    """Guards against a wrong end-of-segment reason: EOS, length, and SGLang's matched_stop."""
    frame = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "demo"}
    frames = [f"data: {json.dumps(frame | {'choices': [{'index': 0} | choice]})}", "data: [DONE]"]
    _, chunks = replay_run(serve_app, Replay(frames), tok, StopSpec(frozenset({8})))
    assert finish(chunks[-1]) == expected


# -- (4) failures ---------------------------------------------------------------------------------


def test_connection_refused_is_retried_then_reported(tok, free_port):
    """Guards against giving up on the first refused connection, and against retrying forever:
    `retries` more attempts with backoff, then a clear EngineConnectionError."""
    engine = OpenAIEngine(f"http://127.0.0.1:{free_port()}", tok, "demo", retries=2, backoff_s=0.01)
    with pytest.raises(EngineConnectionError, match="after 3 attempts"):
        asyncio.run(collect(engine, PROMPT))
    assert engine.stats.connect_retries == 2 and engine.stats.requests == 0


def test_server_dying_mid_stream_is_an_error_without_retry(serve_app, tok):
    """Guards against silently truncated segments and against re-sending a request whose tokens
    were already consumed: the broken stream raises, and the server saw one request."""
    replay = Replay(WITH_IDS, die_after=2)
    got: list[TokenChunk] = []

    async def go():
        engine = OpenAIEngine(serve_app(replay.app), tok, "demo", retries=3)
        async for chunk in engine.generate(PROMPT, GREEDY, StopSpec()):
            got.append(chunk)

    with pytest.raises(EngineConnectionError, match="mid-stream after 2 tokens"):
        asyncio.run(go())
    assert [c.ids for c in got] == SAMPLED[:2] and len(replay.bodies) == 1


def test_a_stream_that_loses_the_engine_says_so_and_is_counted(serve_app, demo_artifacts):
    """Guards against a model server lost mid-stream reaching a streaming client as a generic
    "internal error" frame in a 200 that no metric counts (a non-streaming request gets a 502
    engine_error): the frame carries engine_error and the cause, and the metric rises."""
    from service.app import create_app
    from service.settings import Settings

    engine_url = serve_app(Replay(WITH_IDS, die_after=2).app)
    settings = Settings(
        model=demo_artifacts / "sft", index=demo_artifacts / "index", engine="openai",
        engine_url=engine_url, engine_model="demo", served_model_name="remote",
    )  # fmt: skip
    url = serve_app(create_app(settings))
    body = {"model": "remote", "prompt": "question: x", "agent": False, "stream": True}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    frames = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
    assert reply.status_code == 200 and frames[-1] == "[DONE]"
    error = json.loads(frames[-2])["error"]
    assert error["type"] == "engine_error" and "mid-stream after 2 tokens" in error["message"]
    metrics = httpx.get(f"{url}/metrics").text
    assert 'searchagent_stream_errors_total{type="engine_error"} 1.0' in metrics


def test_http_error_carries_the_server_message_without_retry(serve_app, tok):
    """Guards against an opaque failure: vLLM's error body reaches the exception."""
    message = "This model's maximum context length is 2048 tokens."

    async def reject(request: Request):
        hits.append(1)
        body = {
            "error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}
        }
        return JSONResponse(body, status_code=400)

    hits: list[int] = []
    url = serve_app(Starlette(routes=[Route("/v1/completions", reject, methods=["POST"])]))
    engine = OpenAIEngine(url, tok, "demo", retries=3)
    with pytest.raises(EngineHTTPError, match="HTTP 400: This model's maximum context") as err:
        asyncio.run(collect(engine, PROMPT))
    assert err.value.status == 400 and len(hits) == 1


def test_read_timeout_and_in_band_errors_are_not_retried(serve_app, tok):
    """Guards against retrying a request the server may still be running (read timeout) and
    against ignoring vLLM's in-band error frame."""
    stalled = Replay(WITH_IDS, delay_s=2.0)
    engine = OpenAIEngine(serve_app(stalled.app), tok, "demo", read_timeout_s=0.3)
    with pytest.raises(EngineTimeoutError):
        asyncio.run(collect(engine, PROMPT))
    assert len(stalled.bodies) == 1

    error = '{"error":{"message":"engine core died","type":"InternalServerError","param":null,"code":500}}'  # noqa: E501
    broken = Replay([WITH_IDS[0], f"data: {error}", "data: [DONE]"])
    engine = OpenAIEngine(serve_app(broken.app), tok, "demo")
    with pytest.raises(EngineProtocolError, match="engine core died"):
        asyncio.run(collect(engine, PROMPT))


class Hangup:
    """A raw HTTP/1.1 server whose first `hangups` connections read the request and close: with
    no reply at all ("before"), after the status line and headers ("after_headers"), or after
    a status line that is not HTTP ("garbled"). Later ones answer with `frames` as an SSE body."""

    def __init__(self, frames: list[str], hangups: int = 1, when: str = "before") -> None:
        self.frames, self.hangups, self.when = frames, hangups, when
        self.bodies: list[dict] = []
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer.serve(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def serve(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
        while length and len(body) < int(length[1]):
            body += conn.recv(65536)
        self.bodies.append(json.loads(body))
        payload = "".join(f"{frame}\n\n" for frame in self.frames).encode()
        headers = (
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            f"content-length: {len(payload)}\r\n\r\n"
        ).encode()
        if len(self.bodies) > self.hangups:
            conn.sendall(headers + payload)
        elif self.when == "after_headers":
            conn.sendall(headers)
        elif self.when == "garbled":
            conn.sendall(b"HTTP/1.1 2OO RUINED\r\n\r\n")
        conn.close()

    def __enter__(self) -> Hangup:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_connection_closed_before_any_reply_is_retried(tok):
    """Guards against a failed segment when the server closed the connection before sending
    anything (a pooled keep-alive connection it had dropped: "Server disconnected without
    sending a response" was reported, not retried) — and against retrying once the response
    had begun: then the server may have generated, and the error is reported."""
    with Hangup(WITH_IDS, hangups=1) as server:
        engine = OpenAIEngine(server.url, tok, "demo", retries=2, backoff_s=0.01)
        ids, last = asyncio.run(collect(engine, PROMPT))
    assert ids == [i for chunk in SAMPLED for i in chunk] and finish(last) == ("stop", 4, None)
    assert engine.stats.connect_retries == 1 and len(server.bodies) == 2
    with Hangup(WITH_IDS, hangups=5) as server:
        engine = OpenAIEngine(server.url, tok, "demo", retries=2, backoff_s=0.01)
        with pytest.raises(EngineConnectionError, match="after 3 attempts: Server disconnected"):
            asyncio.run(collect(engine, PROMPT))
    assert len(server.bodies) == 3
    with Hangup(WITH_IDS, hangups=1, when="after_headers") as server:
        engine = OpenAIEngine(server.url, tok, "demo", retries=2, backoff_s=0.01)
        with pytest.raises(EngineConnectionError, match="mid-stream after 0 tokens"):
            asyncio.run(collect(engine, PROMPT))
    assert engine.stats.connect_retries == 0 and len(server.bodies) == 1
    # a reply that began, garbled (a proxy's, say): the request may have run; not sent again
    with Hangup(WITH_IDS, hangups=1, when="garbled") as server:
        engine = OpenAIEngine(server.url, tok, "demo", retries=2, backoff_s=0.01)
        with pytest.raises(EngineConnectionError, match="sent a malformed response"):
            asyncio.run(collect(engine, PROMPT))
    assert engine.stats.connect_retries == 0 and len(server.bodies) == 1


def test_each_event_loops_client_is_closed_with_its_loop(serve_app, tok):
    """Guards against leaking a connection pool per event loop: run in turn under several
    `asyncio.run`s (evaluation scripts), the engine replaced its client without closing the
    old one, whose kept-alive connection stayed open until garbage collection (an "unclosed
    transport" ResourceWarning)."""
    hits: list[int] = []

    async def reject(request: Request):  # read in full: the connection goes back to the pool
        hits.append(1)
        return JSONResponse({"error": {"message": "no"}}, status_code=400)

    url = serve_app(Starlette(routes=[Route("/v1/completions", reject, methods=["POST"])]))
    engine = OpenAIEngine(url, tok, "demo")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with pytest.raises(EngineHTTPError):
                asyncio.run(collect(engine, PROMPT))
        assert engine._clients == {}  # nor does it keep the finished loops alive
        del engine
        gc.collect()
    assert len(hits) == 3
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


# -- (5) closing the iterator aborts the request --------------------------------------------------


@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_closing_the_iterator_drops_the_connection(serve_app, tok, how):
    """Guards against a cancelled agent run that keeps the server generating: after aclose()
    or task cancellation the replay server sees its client go away and stops sending."""
    replay = Replay(WITH_IDS[:1] * 500, delay_s=0.01)
    url = serve_app(replay.app)

    async def consume(stream, got: asyncio.Event):
        async for _ in stream:
            got.set()

    async def go():
        engine = OpenAIEngine(url, tok, "demo")
        stream = engine.generate(PROMPT, GREEDY, StopSpec())
        if how == "aclose":
            await anext(stream)
            await anext(stream)
            start = time.monotonic()
            await stream.aclose()
        else:
            got = asyncio.Event()
            task = asyncio.create_task(consume(stream, got))
            await got.wait()
            start = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert time.monotonic() - start < 1.0
        await engine.aclose()

    asyncio.run(go())
    assert replay.gone.wait(5), "the server never saw the client leave"
    assert replay.sent < 100


class Watched:
    """Delegates to the server's real engine; records how much it produced and when it ended."""

    def __init__(self, inner):
        self.inner = inner
        self.tokenizer = inner.tokenizer
        self.produced = 0
        self.ended = threading.Event()

    async def generate(self, prompt_ids, params, stop):
        try:
            async with aclosing(self.inner.generate(prompt_ids, params, stop)) as chunks:
                async for chunk in chunks:
                    self.produced += len(chunk.ids)
                    yield chunk
        finally:
            self.ended.set()


def test_closing_the_iterator_stops_generation_on_our_server(demo_app, demo_url, tok):
    """Guards against a disconnect that does not reach the engine: closing the OpenAIEngine
    stream makes our server cancel its own engine's generation long before max_tokens."""
    loop = demo_app.state.chat.loop
    watched = Watched(loop.engine)
    loop.engine = watched
    try:

        async def go():
            engine = remote(demo_url, tok)
            params = SamplingParams(max_tokens=400)
            stop = StopSpec()
            stream = engine.generate(loop.prompt_ids("Where was Gal Borin born?"), params, stop)
            await anext(stream)
            await anext(stream)
            await stream.aclose()
            await engine.aclose()

        asyncio.run(go())
        assert watched.ended.wait(10), "the server's engine kept generating"
        assert watched.produced < 100
    finally:
        loop.engine = watched.inner


# -- the CLI: the service on a remote engine ------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", str(DEMO / "sft"),
           "--index", str(DEMO / "index"), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, says",
    [
        (["--engine", "openai"], "needs an engine_url (--engine-url)"),
        (["--engine-url", "http://127.0.0.1:9"], "apply to engine 'openai'"),
        (["--engine", "openai", "--engine-url", "http://127.0.0.1:9"],
         "cannot start: cannot reach the engine"),
    ],
)  # fmt: skip
def test_cli_rejects_bad_engine_settings_with_one_line(args, says):
    """Guards against tracebacks (or a server that starts and fails later) on a wrong engine
    configuration: one line on stderr and exit status 2."""
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert says in r.stderr


@pytest.mark.parametrize(
    "fields, says",
    [
        ({"engine_url": "ftp://x"}, "is not an http(s) URL"),
        ({"engine_url": "http://h:8000", "device": "cpu"}, "device applies to the transformers"),
    ],
)
def test_settings_reject_engine_combinations(fields, says):
    """Guards against settings that cannot work being accepted at start-up."""
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match=re.escape(says)):
        Settings(model=DEMO / "sft", index=DEMO / "index", engine="openai", **fields)


def test_service_runs_on_a_remote_engine(demo_url, serve_cli, monkeypatch):
    """Guards against the --engine openai wiring: `searchagent serve` on our server as its
    engine (model name discovered from /v1/models) answers a chat request exactly as the
    in-process engine does."""
    monkeypatch.setenv("SEARCHAGENT_ENGINE_EXTRA_BODY", '{"agent": false}')
    question = json.loads((DEMO / "world" / "test.jsonl").read_text().splitlines()[0])["question"]
    messages = [{"role": "user", "content": question}]
    local = openai.OpenAI(base_url=f"{demo_url}/v1", api_key="unused", max_retries=0)
    want = local.chat.completions.create(model="demo", messages=messages, max_tokens=160)
    args = ["serve", "--model", str(DEMO / "sft"), "--index", str(DEMO / "index"),
            "--engine", "openai", "--engine-url", demo_url,
            "--served-model-name", "remote"]  # fmt: skip
    with serve_cli(args) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        got = client.chat.completions.create(model="remote", messages=messages, max_tokens=160)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.choices[0].message.model_extra == want.choices[0].message.model_extra
    assert got.usage.completion_tokens == want.usage.completion_tokens


def test_service_on_a_remote_engine_does_not_import_torch():
    """Guards against the remote-engine service needing torch (an optional extra): building
    the app with --engine openai loads no torch or transformers."""
    code = (
        "import sys\n"
        "from service.app import create_app\n"
        "from service.settings import Settings\n"
        f"create_app(Settings(model={str(DEMO / 'sft')!r}, index={str(DEMO / 'index')!r},\n"
        "    engine='openai', engine_url='http://127.0.0.1:9', engine_model='m'))\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
