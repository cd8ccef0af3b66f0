"""SIGTERM drains: `searchagent serve` as a real process finishes the streams it has begun, then
exits (by the signal, as uvicorn does once drained); it takes no new connections meanwhile. What
the drain timeout cuts ends in a way the client can read (`service.drain`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx


def _serve(demo_artifacts, port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`searchagent serve` on the demo checkpoint as a real process, returned once ready."""
    cmd = [
        sys.executable, "-m", "service.cli", "serve",
        "--model", str(demo_artifacts / "sft"), "--index", str(demo_artifacts / "index"),
        "--served-model-name", "demo", "--port", str(port),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("server did not become ready: " + proc.stderr.read().decode())
        time.sleep(0.2)


def test_sigterm_finishes_inflight_streams_then_exits(demo_artifacts, free_port):
    """Guards against: a rolling deploy (Kubernetes sends SIGTERM) cutting answers off mid-stream,
    and a server that never exits after draining."""
    port = free_port()
    proc = _serve(demo_artifacts, port)
    url = f"http://127.0.0.1:{port}"
    try:
        body = {
            "model": "demo",
            "messages": [{"role": "user", "content": "Where was Sethna Drorpethwais born?"}],
            "max_tokens": 96,
            "stream": True,
        }
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the run has begun
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert any("Krendeimpe" in line for line in rest)
        # uvicorn re-raises the signal once drained, so the exit reads as "terminated by SIGTERM"
        assert proc.wait(timeout=30) == -signal.SIGTERM
        try:
            httpx.get(f"{url}/health", timeout=2)
            raise AssertionError("the server still accepts connections after draining")
        except httpx.TransportError:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stderr.read().decode()
    assert "Traceback" not in log, log[-2000:]


def test_what_the_drain_timeout_cuts_ends_with_an_error_the_client_can_read(
    demo_artifacts, free_port
):
    """Guards against: requests still running when the drain timeout ends being cut off with no
    word why (a stream's client saw the connection drop mid-body: httpx RemoteProtocolError; a
    waiting client got no response at all)."""
    port = free_port()
    proc = _serve(demo_artifacts, port, {"SEARCHAGENT_DRAIN_TIMEOUT_S": "1.5"})
    url = f"http://127.0.0.1:{port}/v1/completions"
    # plain decoding with EOS banned: ~1,800 tokens, several seconds, far past the drain timeout
    body = {
        "model": "demo", "prompt": " question: where", "agent": False,
        "max_tokens": 1800, "logit_bias": {"2": -100},
    }  # fmt: skip
    waited: dict[str, httpx.Response] = {}
    waiter = threading.Thread(
        target=lambda: waited.setdefault("r", httpx.post(url, json=body, timeout=60))
    )
    try:
        with httpx.stream("POST", url, json=body | {"stream": True}, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the stream has begun
            waiter.start()
            time.sleep(0.5)  # the non-streaming request is running too
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        cut_after = time.monotonic() - signalled
        waiter.join(timeout=30)
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert error["code"] == "shutting_down" and error["type"] == "service_unavailable"
        assert all("error" not in line for line in rest[:-2])  # text frames until the end
        assert 1.0 < cut_after < 5.0  # at the drain timeout, not at the end of the generation
        assert waited["r"].status_code == 503
        assert waited["r"].json()["error"]["code"] == "shutting_down"
        assert proc.wait(timeout=30) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stderr.read().decode()
    assert "Traceback" not in log, log[-2000:]
