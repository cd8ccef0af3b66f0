"""SIGTERM drains: `searchagent serve` as a real process finishes the streams it has begun, then
exits (by the signal, as uvicorn does once drained); it takes no new connections meanwhile."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx


def test_sigterm_finishes_inflight_streams_then_exits(demo_artifacts, free_port):
    """Guards against: a rolling deploy (Kubernetes sends SIGTERM) cutting answers off mid-stream,
    and a server that never exits after draining."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "service.cli", "serve",
        "--model", str(demo_artifacts / "sft"), "--index", str(demo_artifacts / "index"),
        "--served-model-name", "demo", "--port", str(port),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
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
