"""Hypothesis fuzzing of every route of a real uvicorn server with over a thousand requests.

Bodies mix valid-shaped requests (they reach the model: the server caps generation at 8 tokens
and one search, so they stay fast) with malformed ones: wrong types, missing fields, huge and
negative numbers, control characters, NUL and lone surrogates, deep nesting, bytes that are not
JSON or not UTF-8, empty bodies and wrong content types, streaming or not. Every response must be
a 2xx or an OpenAI-shaped error, never a 5xx; a stream must end with `data: [DONE]` and carry no
error frame; a request that takes 30 s is a hang. The run is derandomized, but Hypothesis also
draws literals from every local module loaded (its "local constants"), so the requests are the same
only for the same code and the same modules imported: a failure prints the request it sent.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import serving_process

EXAMPLES = 1_050
TIMEOUT_S = 30.0
QUESTION = "Where was Sethna Drorpethwais born?"


@dataclass(frozen=True)
class Request:
    """One HTTP request as sent (bytes, not a JSON value: some bodies are not JSON)."""

    method: str
    path: str
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # the body asks for a stream: known when generated, since parsing the body here would
    # meet 200,000-deep nestings (a RecursionError inside json's C scanner, in the test process)
    stream: bool = False

    def __str__(self) -> str:
        body = "" if self.content is None else f" {self.content[:600]!r}"
        return f"{self.method} {self.path} {self.headers}{body}"


# -- values -----------------------------------------------------------------------------------

ODD_TEXT = [
    "", " ", "\x00", "a\x00b", "\n\t\r", "\u202e\u200b", "\U0001f600" * 8, "\ud800", "\udfff x",
    "<search> x </search>", "</think><answer> x </answer>", "<documents>", "x" * 3000, QUESTION,
]  # fmt: skip
text = st.text(st.characters(exclude_categories=()), max_size=24) | st.sampled_from(ODD_TEXT)
words = st.text(st.characters(exclude_categories=()), min_size=1, max_size=24).filter(str.strip)
EDGE_NUMBERS = [
    0, -1, 2**31, 2**63, 2**64 + 1, -(2**63) - 1, 10**30, 10**400, 1e308, -1e308, 0.5, -0.0,
    float("nan"), float("inf"), float("-inf"), True, "8", None,
]  # fmt: skip
scalar = st.none() | st.booleans() | st.integers() | st.floats() | text
junk = st.sampled_from(EDGE_NUMBERS) | st.recursive(
    scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=12,
)  # json.dumps writes NaN and Infinity, which Python's json.loads (the server's) accepts


def body(required: dict, optional: dict, bad: dict | None = None) -> st.SearchStrategy[object]:
    """Mostly valid objects (`required` keys, any of `optional`), else one of them mutated:
    a field with a wrong value (`bad[key]` or anything), a field dropped, unknown fields added;
    now and then not an object at all."""
    bad = bad or {}
    valid = st.fixed_dictionaries(required, optional=optional)
    keys = sorted({*required, *optional, *bad})

    def mutations(d: dict) -> st.SearchStrategy[object]:
        wrong = st.sampled_from(keys).flatmap(
            lambda k: st.one_of(bad.get(k, junk), junk).map(lambda v: {**d, k: v})
        )
        dropped = st.sampled_from(sorted(d)).map(lambda k: {x: d[x] for x in d if x != k})
        extra = st.dictionaries(text, junk, min_size=1, max_size=2).map(lambda e: {**e, **d})
        return st.one_of(wrong, wrong, dropped, extra)

    return st.one_of(valid, valid, valid, valid, valid.flatmap(mutations), junk)


content = text | st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=3
)
role = st.sampled_from(["user", "system", "assistant", "developer", "tool"])
message = st.fixed_dictionaries({"role": role, "content": content}, optional={"name": text})
question = (
    words
    | st.just(QUESTION)
    | st.lists(
        st.fixed_dictionaries({"type": st.just("text"), "text": words}), min_size=1, max_size=2
    )
)
messages = st.builds(
    lambda before, q: [*before, {"role": "user", "content": q}],
    st.lists(message, max_size=2),
    question,
)
bad_message = body({"role": role, "content": content}, {"name": text}, {"role": text})
bad_messages = st.lists(bad_message, max_size=3) | st.lists(message, max_size=2)

GENERATION = {
    "max_tokens": st.integers(1, 8) | st.sampled_from([2**31, 10**30]),  # the server caps it
    "max_searches": st.integers(0, 1), "top_k": st.integers(1, 5),
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1, exclude_min=True),
    "seed": st.integers(-(2**70), 2**70),
    "logit_bias": st.dictionaries(st.integers(-3, 2100).map(str) | text, st.floats(-150, 150)
                                  | st.floats() | text, max_size=3),
    "n": st.sampled_from([1] * 15 + [2]),  # rare: a batch of two runs takes seconds on CPU
    "stop": st.none() | text | st.lists(text, max_size=4),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "user": text,
}  # fmt: skip
CHAT = {
    **GENERATION, "max_completion_tokens": st.integers(1, 8),
    "trace": st.sampled_from(["reasoning", "content", "none"]),
}  # fmt: skip
COMPLETION = {
    **GENERATION, "agent": st.booleans(), "echo": st.just(False), "logprobs": st.none(),
    "stop_token_ids": st.lists(st.integers(0, 2047), max_size=3), "return_token_ids": st.booleans(),
    "include_stop_str_in_output": st.booleans(), "skip_special_tokens": st.booleans(),
    "add_special_tokens": st.booleans(),
}  # fmt: skip
prompt = st.one_of(
    words, st.lists(st.integers(0, 2047), min_size=1, max_size=8), st.lists(words, max_size=1)
)
ANY_PROMPT = st.one_of(
    text, st.lists(st.integers(-5, 2100), max_size=8), st.lists(text, max_size=3),
    st.lists(st.lists(st.integers(0, 2047), max_size=4), max_size=3),
)  # fmt: skip
# wrong values worth more than `junk` (and `tools`, which only a mutation sends)
BAD_CHAT = {"messages": bad_messages, "model": text, "tools": st.lists(junk, max_size=1)}
BAD_COMPLETION = {
    "prompt": ANY_PROMPT, "model": text, "echo": st.just(True), "logprobs": st.integers(-1, 2),
    "stop_token_ids": st.lists(st.integers(), max_size=3),
}  # fmt: skip
BAD_QUERIES = {"queries": st.lists(text, max_size=4)}
BODIES = {
    "/v1/chat/completions": body(
        {"model": st.just("demo"), "messages": messages, "stream": st.booleans()}, CHAT, BAD_CHAT
    ),
    "/v1/completions": body(
        {"model": st.just("demo"), "prompt": prompt, "stream": st.booleans()},
        COMPLETION,
        BAD_COMPLETION,
    ),
    "/retrieve": body(
        {"queries": st.lists(words, min_size=1, max_size=3)},
        {"topk": st.integers(1, 5), "return_scores": st.booleans()},
        BAD_QUERIES,
    ),
    "/queries": body(
        {"queries": st.lists(words, min_size=1, max_size=3)}, {"k": st.integers(1, 5)}, BAD_QUERIES
    ),
}

# -- requests ---------------------------------------------------------------------------------

JSON = {"content-type": "application/json"}
WRONG_TYPES = [
    {}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"},
    {"content-type": "multipart/form-data"}, {"content-type": "application/json; charset=latin-1"},
    {"content-type": "application/json", "content-encoding": "gzip"},
]  # fmt: skip


def nested(depth: int, list_: bool) -> bytes:
    """`[[[...]]]` or `{"a":{"a":...1}}`, `depth` deep (a named function, so a failure report
    prints `nested(depth=100000, ...)`, not 200 kB of brackets)."""
    if list_:
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def encoded(value) -> bytes:
    return json.dumps(value).encode()  # ASCII escapes: lone surrogates travel as \udXXX


RAW = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"null", b"{}", b"[]", b'"x"', b"1e999999", b"{", b"\xff\xfe{}",
                     b'{"model": "demo", "messages": [{"role": "user", "content": "\\ud800"}]}',
                     b'{"model": "demo", "max_tokens": ' + b"9" * 5000 + b"}"]),
    st.builds(nested, st.integers(1, 200_000), st.booleans()),
)  # fmt: skip


def streams(body: object) -> bool:
    return isinstance(body, dict) and body.get("stream") is True


def post(path: str) -> st.SearchStrategy[Request]:
    as_json = BODIES[path].map(lambda b: Request("POST", path, encoded(b), JSON, streams(b)))
    mistyped = st.builds(
        lambda b, h: Request("POST", path, encoded(b), h, streams(b)),
        BODIES[path],
        st.sampled_from(WRONG_TYPES),
    )
    raw = st.builds(lambda b, h: Request("POST", path, b, h), RAW, st.sampled_from([JSON, {}]))
    return st.one_of(as_json, as_json, as_json, as_json, as_json, as_json, mistyped, raw)


ROUTES = ["/health", "/ready", "/metrics", "/v1/models", *BODIES]
other = st.builds(
    Request,
    st.sampled_from(["GET", "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    st.sampled_from(ROUTES) | text.map(lambda t: "/v1/" + t.encode("utf-8", "replace").hex()),
    st.none() | RAW,
)
requests = st.one_of(*(post(path) for path in BODIES), other)


# -- the oracle -------------------------------------------------------------------------------


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    streams: int = 0
    generated: int = 0  # 2xx from a generation route


def problem(request: Request, r: httpx.Response, text_: str) -> str | None:
    """What is wrong with the response, or None."""
    ctype = r.headers.get("content-type", "")
    if r.status_code >= 500:
        return "a 5xx"
    if 200 <= r.status_code < 300:
        if request.stream and not ctype.startswith("text/event-stream"):
            return "stream: true answered without server-sent events"
        if ctype.startswith("text/event-stream"):
            frames = [line[6:] for line in text_.splitlines() if line.startswith("data: ")]
            if not frames or frames[-1] != "[DONE]":
                return "a stream that does not end with data: [DONE]"
            try:
                chunks = [json.loads(f) for f in frames[:-1]]
            except ValueError:
                return "a data frame that is not JSON"
            if any("error" in c for c in chunks):
                return "an error frame inside a 200 stream"
            return None
        try:
            if ctype.startswith("application/json"):
                json.loads(text_)
        except ValueError:
            return "a 2xx whose JSON body does not parse"
        return None
    try:
        error = json.loads(text_)["error"]
    except (ValueError, KeyError, TypeError):
        return f"a {r.status_code} whose body is not an OpenAI error"
    if set(error) != {"message", "type", "param", "code"} or not error["message"]:
        return "an error body without exactly message/type/param/code"
    if not all(isinstance(error[k], str | None) for k in ("param", "code", "type")):
        return "an error body with non-string fields"
    return None


def send(client: httpx.Client, url: str, request: Request, tally: Tally) -> None:
    tally.sent += 1
    start = time.monotonic()
    with client.stream(
        request.method, url + request.path, content=request.content, headers=request.headers
    ) as r:
        text_ = r.read().decode("utf-8", "replace")
    # httpx's timeout bounds each read; a stream trickling forever is caught here
    found = "a hang" if time.monotonic() - start > TIMEOUT_S else problem(request, r, text_)
    assert found is None, f"{found}\nrequest: {request}\nresponse: {r.status_code} {text_[:2000]}"
    tally.ok += r.status_code < 300
    tally.errors += r.status_code >= 400
    tally.streams += r.headers.get("content-type", "").startswith("text/event-stream")
    tally.generated += r.status_code < 300 and request.path.endswith("completions")


@pytest.fixture(scope="module")
def fuzz_url(demo_artifacts, free_port, tmp_path_factory):
    """`searchagent serve` on the demo model, capped at 8 new tokens and one search per run: any
    request that passes validation finishes in a fraction of a second, whatever max_tokens it
    asks for. Its log (tracebacks of any 5xx) is `server.log` in the test's tmp directory."""
    args = ["serve", "--model", str(demo_artifacts / "sft"), "--index",
            str(demo_artifacts / "index"), "--served-model-name", "demo"]  # fmt: skip
    env = {"SEARCHAGENT_MAX_TOKENS": "8", "SEARCHAGENT_MAX_SEARCHES": "1"}
    log = tmp_path_factory.mktemp("fuzz-server") / "server.log"
    with serving_process(args, free_port(), env, log) as url:
        yield url


def test_fuzzed_requests_never_get_a_5xx_or_hang(fuzz_url):
    """Guards against client input that crashes a handler (a 5xx), an error that is not
    OpenAI-shaped, a stream cut short of [DONE], and a request that hangs."""
    tally = Tally()
    # no keep-alive: a connection the server drops after one response must not fail the next
    with httpx.Client(
        timeout=TIMEOUT_S, limits=httpx.Limits(max_keepalive_connections=0)
    ) as client:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[
                HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                HealthCheck.large_base_example,
            ],
        )  # fmt: skip
        @given(requests)
        def fuzz(request: Request) -> None:
            send(client, fuzz_url, request, tally)

        fuzz()
    assert tally.sent >= 1_000, tally
    # not a run of rejections only: the model path, streams and errors were all exercised (about
    # 115, 55 and 700 of them; the mix moves with the constants Hypothesis picks up, see above)
    assert tally.generated >= 80 and tally.streams >= 30 and tally.errors >= 300, tally


# -- what the fuzzer found (fixed, kept as regressions), minimised ------------------------


def chat_body(**fields) -> dict:
    return {"model": "demo", "messages": [{"role": "user", "content": QUESTION}], **fields}


FOUND = {
    # torch.Generator().manual_seed takes [-2**63, 2**64): "Overflow when unpacking long long"
    "seed_above_uint64": ("/v1/chat/completions", chat_body(seed=2**64)),
    "seed_below_int64": ("/v1/chat/completions", chat_body(seed=-(2**63) - 1)),
    "plain_completion_seed": (
        "/v1/completions", {"model": "demo", "prompt": QUESTION, "agent": False, "seed": 2**64}
    ),
    # logits / 5e-324 in float32 is a division by zero: softmax of inf is nan, multinomial raises
    "temperature_underflows": ("/v1/chat/completions", chat_body(temperature=5e-324)),
    # top_p is 0 in float32: no token is kept, "invalid multinomial distribution"
    "top_p_underflows": ("/v1/chat/completions", chat_body(temperature=1, top_p=5e-324)),
    # a lone surrogate ("\ud800" in the JSON) parses into a str the tokenizer refuses
    # ("TextInputSequence must be str") and that cannot be written back as UTF-8
    "surrogate_in_user_message": (
        "/v1/chat/completions",
        {"model": "demo", "messages": [{"role": "user", "content": "\ud800"}]},
    ),
    "surrogate_in_system_message": (
        "/v1/chat/completions",
        {"model": "demo", "messages": [{"role": "system", "content": "\udfff"},
                                       {"role": "user", "content": QUESTION}]},
    ),
    "surrogate_in_prompt": ("/v1/completions", {"model": "demo", "prompt": "\ud800"}),
    "surrogate_in_model_name": ("/v1/chat/completions", chat_body(model="\ud800")),
    "surrogate_in_queries": ("/queries", {"queries": ["\ud800"]}),
}  # fmt: skip
CASES = [
    pytest.param(case, stream, id=f"{case}-{'stream' if stream else 'plain'}")
    for case, (path, _) in FOUND.items()
    for stream in ((False, True) if path.endswith("completions") else (False,))
]


@pytest.mark.parametrize(("case", "stream"), CASES)
def test_fuzz_findings(fuzz_url, case, stream):
    """Guards against the 500s (and, streaming, the in-band internal_error frames) the fuzzer
    found, each minimised to one field: input the schema accepts must not crash the server."""
    path, body = FOUND[case]
    if stream:
        body = {**body, "stream": True}
    with httpx.Client(timeout=TIMEOUT_S) as client:
        send(client, fuzz_url, Request("POST", path, encoded(body), JSON, stream), Tally())
