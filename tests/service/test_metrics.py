"""`GET /metrics` (service/metrics.py) over a real uvicorn on the demo checkpoint: the exposition
passes `promtool check metrics`, and a client that disconnects mid-stream leaves neither a running
request nor engine work behind.

promtool is a test requirement like redis-server: `.ci/run` installs it (the one binary from
Debian's prometheus package), so a missing promtool fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

QUESTION = "Where was Sethna Drorpethwais born?"
CHAT = "/v1/chat/completions"


@pytest.fixture
def url(demo_app, serve_app) -> str:
    return serve_app(demo_app)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not on PATH. CI installs it in .ci/run (the promtool block: it extracts "
            "/usr/bin/promtool from Debian's prometheus .deb into /usr/local/bin); run that "
            "block as root here too."
        )
    return path


def scrape(url: str) -> str:
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200
    return r.text


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the one sample `name{labels}` in an exposition (KeyError if absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{name}{labels} not in /metrics")


def chat_body(**extra) -> dict:
    return {"model": "demo", "messages": [{"role": "user", "content": QUESTION}], **extra}


def test_metrics_pass_promtool_check(url):
    """Guards against an exposition Prometheus lints as wrong (a counter without `_total`, a
    non-base unit, a bad HELP line): every series is exercised first, since a labelled series
    that never got a sample is not exposed and so would not be checked."""
    tool = promtool()
    r = httpx.post(f"{url}{CHAT}", json=chat_body(), timeout=60)  # the model searches: a miss
    assert r.status_code == 200 and r.json()["usage"]["searches"] >= 1
    with httpx.stream("POST", f"{url}{CHAT}", json=chat_body(stream=True), timeout=60) as s:
        assert s.status_code == 200 and [x for x in s.iter_lines() if x][-1] == "data: [DONE]"
    assert httpx.post(f"{url}{CHAT}", json={**chat_body(), "model": "nope"}).status_code == 404
    r = httpx.post(f"{url}/retrieve", json={"queries": ["Krendeimpe harbour"], "topk": 2})
    assert r.status_code == 200

    text = scrape(url)
    assert sample(text, "searchagent_requests_total", route=CHAT, status="200") == 2
    assert sample(text, "searchagent_requests_total", route=CHAT, status="404") == 1
    assert sample(text, "searchagent_time_to_first_token_seconds_count") == 1
    assert sample(text, "searchagent_retrieval_duration_seconds_count") >= 2
    assert sample(text, "searchagent_cache_hits_total") >= 1  # the streamed run's search
    assert sample(text, "searchagent_generation_tokens_total") > 0
    checked = subprocess.run(
        [tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0, f"promtool check metrics exited {checked.returncode}:\n{output}"


def test_client_disconnect_frees_the_request_and_the_engine(demo_app, url):
    """Guards against a closed connection leaving its agent run going: the running gauge stuck
    at 1 and the engine decoding the rest of max_tokens for nobody (design: "Client disconnect
    cancels the loop and the engine work at once").

    At temperature 2 with this seed the demo model's first segment writes no tag at all: left
    alone, the engine decodes all 400 tokens in one go (seconds on CPU). So the engine is busy
    with this request when the client leaves, and stays busy unless the disconnect reaches it;
    short segments would end on their own and hide an engine that ignores cancellation."""
    engine = demo_app.state.chat.loop.engine
    before = scrape(url)
    body = chat_body(stream=True, max_tokens=400, temperature=2.0, seed=8)
    with httpx.Client(timeout=30) as client, client.stream("POST", f"{url}{CHAT}", json=body) as r:
        assert r.status_code == 200
        frames = 0
        lines = r.iter_lines()  # held: a dropped line iterator would close the connection here
        for line in lines:
            if line.startswith("data: {"):
                delta = json.loads(line[len("data: ") :])["choices"][0]["delta"]
                frames += bool(delta.get("content") or delta.get("reasoning_content"))
            if frames == 5:
                break
        assert frames == 5
        # mid-run: the loop is running and the engine holds a row for it
        assert sample(scrape(url), "searchagent_requests_running") == 1
        assert engine.running == 1
    # both contexts have exited: the response and its connection are closed
    closed_at = time.monotonic()
    steps_at_close = engine.stats.decode_steps

    while True:
        running = sample(scrape(url), "searchagent_requests_running")
        if running == 0 and engine.running == 0:
            break
        waited = time.monotonic() - closed_at
        more = engine.stats.decode_steps - steps_at_close
        assert waited < 1.0, (
            f"{waited:.2f} s after the disconnect: requests_running={running}, "
            f"engine rows={engine.running}, decode steps since the disconnect={more}"
        )
        time.sleep(0.02)
    steps = engine.stats.decode_steps
    time.sleep(0.3)
    assert engine.stats.decode_steps == steps, "the engine kept decoding after the disconnect"
    # the work done before the client left is counted, as a finished run's would be
    after = scrape(url)

    def added(name: str) -> float:
        return sample(after, name) - sample(before, name)

    assert added("searchagent_generation_tokens_total") >= 5  # at least the 5 frames read
    assert added("searchagent_prompt_tokens_total") > 0
    assert added("searchagent_searches_per_request_count") == 1
