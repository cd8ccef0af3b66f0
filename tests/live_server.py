"""Real servers for tests: `serving(app, port)` runs an app under uvicorn in a thread;
`serving_process(args, port, env, log)` runs `python -m service.cli ARGS` as a process, its output
in a file (a pipe no one reads while the server runs would fill and block it). conftest's
fixtures are built on these, and a module can use them directly for a module-wide server. The
fuzz module needs the process: a server in the test's own interpreter shares its recursion limit,
which Hypothesis raises and lowers around every example, while the fuzzer sends 200,000-deep JSON.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn


@contextlib.contextmanager
def serving(app, port: int) -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive():
            pytest.fail("uvicorn exited during start-up")
        if time.monotonic() > deadline:
            pytest.fail("uvicorn did not start within 60 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def serving_process(
    args: list[str], port: int, env: dict[str, str], log: Path, timeout_s: float = 120
) -> Iterator[str]:
    """The CLI server until `/health` answers; its stdout and stderr go to `log`."""
    cmd = [sys.executable, "-m", "service.cli", *args, "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{' '.join(args[:1])} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
