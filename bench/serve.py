"""Benchmark: the served API under bounded load, and what HTTP + SSE cost over the bare loop.

A closed-loop load generator: at each concurrency C, C workers pull from a shared list of exactly
N chat requests (demo test questions, greedy, a fixed `max_tokens`), each taking the next when its
previous one ends. The same requests run two ways, interleaved per level:

- **http**: `searchagent serve` as a subprocess (its own process, so client and server do not
  share a GIL), driven over keep-alive HTTP/1.1 connections streaming `POST /v1/chat/completions`
  (`stream: true`, `include_usage`) with a lean SSE client (`SseConnection`: it reads the chunked
  body, splits events and parses every JSON frame, as any streaming client must, and nothing
  more). TTFT is the first non-empty `content`/`reasoning_content` delta; inter-token latency
  (ITL) the gaps between consecutive deltas; tokens come from the usage chunk. `--httpx` adds a
  third mode, the same requests through httpx, whose heavier parsing (about twice the client CPU
  per request) also runs on the server's cores.
- **in-process**: the same app objects built here (`create_app(settings).state.chat`), each
  request through `service.chat.prepare` exactly as the route does, then `ctx.loop.run` driven
  directly. TTFT is the first Token/Documents event with text; ITL the gaps between them; tokens
  from the Finished event's usage.

Reported per mode: requests/s, generated tokens/s, TTFT p50/p95, ITL p50, end-to-end latency
p50/p95; per level the HTTP overhead, 1 - (http req/s / in-process req/s), and the e2e p50 ratio
(acceptance: overhead <= 10%). ITL includes the gaps across searches in both modes. Each mode
has its own engine and sees the same request sequence; each (level, round) gets fresh questions,
so neither the retrieval cache nor parked sessions hold a measured request ahead of time. Greedy
runs do identical work: the modes' per-request token counts are compared and a mismatch printed.
The bench process runs on uvloop, as the server does. On a small machine the modes' order and
the moment matter by several percent: use several rounds (each alternates the order).

    PYTHONPATH=. .venv/bin/python -m bench.serve --model artifacts/demo/sft \\
        --index artifacts/demo/index --requests 32 --concurrency 1,4,16 --max-tokens 96 --rounds 8
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import uvloop

from agent.events import Documents, Finished, Token
from bench.stats import percentile
from service.app import create_app
from service.chat import ChatContext, prepare
from service.protocol import ChatCompletionRequest
from service.settings import Settings

DEMO = Path("artifacts/demo")
MODEL_NAME = "bench"


@dataclass
class Sample:
    """One request as its client saw it (seconds)."""

    ttft: float
    gaps: list[float]
    e2e: float
    tokens: int


@dataclass
class Run:
    """One mode at one concurrency level: wall seconds and the samples in request order."""

    wall: float
    samples: list[Sample]


def sample(start: float, stamps: list[float], end: float, tokens: int | None) -> Sample:
    """From the request's start, the arrival time of each delta, and its end."""
    assert tokens is not None, "the request ended without usage"
    ttft = (stamps[0] if stamps else end) - start
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return Sample(ttft, gaps, end - start, tokens)


class SseConnection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and yields the SSE events of the reply.

    The load generator shares the server's two cores, so its per-frame cost is taken from the
    decode: this client does only what a streaming client must (read the chunked body, split
    events, parse each JSON frame), less than half of httpx's CPU per request (measured: 2.7 vs
    7.0 ms at 16 callers).
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_events(self, path: str, body: dict) -> AsyncIterator[bytes]:
        data = json.dumps(body).encode()
        request = (
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Accept: text/event-stream\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), self.host.encode(), len(data), data)
        )
        status = b""
        for _ in range(2):  # the server may have closed an idle keep-alive connection: reopen
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            assert self.reader is not None
            self.writer.write(request)
            try:
                status = await self.reader.readline()
            except ConnectionError:
                status = b""
            if status:
                break
            await self.close()
        assert self.reader is not None
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if b" 200 " not in status or headers.get("transfer-encoding") != "chunked":
            text = await self.reader.read(int(headers.get("content-length", "0")))
            await self.close()
            raise RuntimeError(f"{status.decode().strip()}: {text[:500]!r}")
        buf = b""
        while size := int((await self.reader.readline()).split(b";")[0], 16):
            buf += await self.reader.readexactly(size + 2)  # the chunk and its CRLF
            buf = buf[:-2]
            while (end := buf.find(b"\n\n")) >= 0:
                event, buf = buf[:end], buf[end + 2 :]
                yield event
        await self.reader.readline()  # the CRLF after the last chunk

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Pool:
    """Idle keep-alive connections: a request takes one (or opens one) and returns it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[SseConnection] = []


def read_frame(payload: bytes | str, stamps: list[float]) -> int | None:
    """One `data:` frame's JSON: stamps its arrival if it carries text; its completion tokens
    if it is the usage chunk."""
    chunk = json.loads(payload)
    if "error" in chunk:
        raise RuntimeError(f"error frame: {chunk['error']}")
    for choice in chunk["choices"]:
        delta = choice["delta"]
        if delta.get("content") or delta.get("reasoning_content"):
            stamps.append(time.perf_counter())
    return chunk["usage"]["completion_tokens"] if chunk.get("usage") else None


async def http_one(pool: Pool, body: dict) -> Sample:
    conn = pool.idle.pop() if pool.idle else SseConnection(pool.host, pool.port)
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = None
    async for event in conn.post_events("/v1/chat/completions", body):
        # ": searching" keep-alives carry nothing; the body ends right after [DONE]
        if event.startswith(b"data: ") and event != b"data: [DONE]":
            if (n := read_frame(event[6:], stamps)) is not None:
                tokens = n
    end = time.perf_counter()
    pool.idle.append(conn)
    return sample(start, stamps, end, tokens)


async def httpx_one(client: httpx.AsyncClient, body: dict) -> Sample:
    """The request through httpx (`--httpx`: what a heavier client costs the server's cores)."""
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:500]!r}")
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if (n := read_frame(line[6:], stamps)) is not None:
                    tokens = n
    return sample(start, stamps, time.perf_counter(), tokens)


async def inprocess_one(ctx: ChatContext, body: dict) -> Sample:
    start = time.perf_counter()
    run = prepare(ctx, ChatCompletionRequest.model_validate(body))
    stamps: list[float] = []
    tokens = None
    async with aclosing(ctx.loop.run(run.prompt_ids, run.params)) as events:
        async for event in events:
            if isinstance(event, Token | Documents) and event.text:
                stamps.append(time.perf_counter())
            elif isinstance(event, Finished):
                tokens = event.usage.completion_tokens
    return sample(start, stamps, time.perf_counter(), tokens)


async def closed_loop(
    one: Callable[[dict], Awaitable[Sample]], bodies: list[dict], concurrency: int
) -> Run:
    """`concurrency` workers pull the next request as soon as their previous one ends."""
    results: list[Sample | None] = [None] * len(bodies)
    todo = iter(enumerate(bodies))

    async def worker() -> None:
        for i, body in todo:
            results[i] = await one(body)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Run(time.perf_counter() - start, results)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(cmd: list[str]) -> Iterator[tuple[subprocess.Popen, Path]]:
    """`cmd` running, its stderr in a scratch file (a pipe nobody reads would fill and block)."""
    log = Path(tempfile.mkstemp(prefix="bench-serve-", suffix=".log")[1])
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        yield proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.unlink()


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            sys.exit(f"the server exited:\n{log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            sys.exit(f"the server was not ready within {timeout_s:.0f} s")
        time.sleep(0.2)


def summary(runs: list[Run]) -> dict[str, float]:
    samples = [s for r in runs for s in r.samples]
    wall = sum(r.wall for r in runs)
    ttft = [s.ttft for s in samples]
    e2e = [s.e2e for s in samples]
    gaps = [g for s in samples for g in s.gaps]
    return {
        "rps": len(samples) / wall,
        "tps": sum(s.tokens for s in samples) / wall,
        "ttft50": percentile(ttft, 0.5) * 1e3,
        "ttft95": percentile(ttft, 0.95) * 1e3,
        "itl50": percentile(gaps, 0.5) * 1e3 if gaps else float("nan"),
        "e2e50": statistics.median(e2e),
        "e2e95": percentile(e2e, 0.95),
    }


def load_questions(path: Path) -> list[str]:
    if not path.exists():
        from training.demo import build_demo_data

        build_demo_data(DEMO)
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r["question"] for r in rows]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, default=DEMO / "sft")
    p.add_argument("--index", type=Path, default=DEMO / "index")
    p.add_argument("--data", type=Path, default=DEMO / "world" / "test.jsonl")
    p.add_argument("--requests", type=int, default=64, help="per level, per mode, per round")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=1, help="per level; the mode order alternates")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--httpx", action="store_true", help="also run the requests through httpx")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    max_running = max(64, *levels)  # nothing queues in the server's admission
    questions = load_questions(args.data)
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", str(args.model),
           "--index", str(args.index), "--served-model-name", MODEL_NAME, "--port", str(port),
           "--max-running-requests", str(max_running)]  # fmt: skip
    if args.device:
        cmd += ["--device", args.device]
    print(f"command: python -m bench.serve {shlex.join(sys.argv[1:])}")
    print(f"server: {shlex.join(cmd)}")
    print(
        f"{args.requests} requests per level, mode and round; concurrency {levels}; "
        f"{args.rounds} round(s); greedy, max_tokens {args.max_tokens}; "
        f"device {args.device or 'auto'}; {os.cpu_count()} cpus; questions from {args.data}"
    )

    def body(question: str) -> dict:
        return {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": args.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    # the server loads in its process while the in-process app loads here
    with server(cmd) as (proc, log):
        settings = Settings(
            model=args.model, index=args.index, served_model_name=MODEL_NAME,
            max_running_requests=max_running, device=args.device,
        )  # fmt: skip
        ctx: ChatContext = create_app(settings).state.chat
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, log)
        # uvloop, as the server runs: the in-process loop and the client get the same event loop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(bench(args, levels, port, ctx, [body(q) for q in questions], proc.pid))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (/proc, Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench(
    args: argparse.Namespace,
    levels: list[int],
    port: int,
    ctx: ChatContext,
    bodies: list[dict],
    server_pid: int,
) -> None:
    url = f"http://127.0.0.1:{port}"
    limits = httpx.Limits(max_connections=max(levels), max_keepalive_connections=max(levels))
    pool = Pool("127.0.0.1", port)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        modes = {"http": partial(http_one, pool), "in-process": partial(inprocess_one, ctx)}
        if args.httpx:
            modes["http (httpx)"] = partial(httpx_one, client)
        for one in modes.values():  # warm-up: threads, allocator, connection
            await one(bodies[-1])
        print("| concurrency | mode | req/s | gen tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms "
              "| e2e p50 s | e2e p95 s |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        start, mismatches = 0, 0
        cpu_rows = []  # CPU ms per request: (level, server over HTTP, client over HTTP, in-process)
        for c in levels:
            cpu = {"server": 0.0, "client": 0.0, "in-process": 0.0}
            runs: dict[str, list[Run]] = {m: [] for m in modes}
            for r in range(args.rounds):
                chunk = [bodies[(start + i) % (len(bodies) - 1)] for i in range(args.requests)]
                start += args.requests
                order = list(modes) if r % 2 == 0 else list(reversed(modes))
                for mode in order:
                    before = cpu_seconds(server_pid), cpu_seconds(os.getpid())
                    runs[mode].append(await closed_loop(modes[mode], chunk, c))
                    served, here = (
                        cpu_seconds(server_pid) - before[0],
                        cpu_seconds(os.getpid()) - before[1],
                    )
                    if mode == "http":
                        cpu["server"] += served
                        cpu["client"] += here
                    elif mode == "in-process":
                        cpu["in-process"] += here
                http, local = runs["http"][-1], runs["in-process"][-1]
                mismatches += sum(
                    a.tokens != b.tokens for a, b in zip(http.samples, local.samples, strict=True)
                )
            stats = {m: summary(rs) for m, rs in runs.items()}
            for mode, s in stats.items():
                print(f"| {c} | {mode} | {s['rps']:.2f} | {s['tps']:.0f} | {s['ttft50']:.0f} | "
                      f"{s['ttft95']:.0f} | {s['itl50']:.1f} | {s['e2e50']:.2f} | "
                      f"{s['e2e95']:.2f} |")  # fmt: skip
            i = stats["in-process"]
            for mode in (m for m in modes if m != "in-process"):
                h = stats[mode]
                label = "HTTP overhead" + mode.removeprefix("http")
                each = [
                    1 - a.wall / b.wall for a, b in zip(runs["in-process"], runs[mode], strict=True)
                ]
                spread = f" (rounds {min(each):.1%} to {max(each):.1%})" if len(each) > 1 else ""
                print(f"| {c} | **{label}** | {1 - h['rps'] / i['rps']:.1%}{spread} | | | | | "
                      f"{h['e2e50'] / i['e2e50']:.2f}x | |")  # fmt: skip
            n = args.requests * args.rounds
            cpu_rows.append((c, *(1000 * cpu[k] / n for k in ("server", "client", "in-process"))))
    # The serving work itself: CPU the server spends per request against the in-process loop's
    # (the client shares this machine's cores, so wall-clock overhead also counts its CPU).
    print()
    print("| concurrency | server CPU ms/req (http) | client CPU ms/req (http) | "
          "in-process CPU ms/req | server / in-process |")  # fmt: skip
    print("|---|---|---|---|---|")
    for c, server_ms, client_ms, local_ms in cpu_rows:
        print(f"| {c} | {server_ms:.0f} | {client_ms:.0f} | {local_ms:.0f} | "
              f"{server_ms / local_ms:.2f}x |")  # fmt: skip
    if mismatches:
        print(f"WARNING: {mismatches} requests generated a different number of tokens over HTTP")
    else:
        print("every request generated the same number of tokens in both modes")


if __name__ == "__main__":
    main()
