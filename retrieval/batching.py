"""`BatchingRetriever`: coalesces concurrent `search` calls into one call of the wrapped retriever.

A dense search pays per call for what a batch shares: the hop to a worker thread, the encoder's
per-call overhead, and FAISS's pass over every stored vector (one matrix product serves a whole
batch). The agent loop, though,
sends one query per request. So calls with the same k are collected into a window and sent to
`inner.search` as one batch of at most `max_batch` queries; each caller gets its slice back. Calls
with a different k go to different batches, so a caller sees exactly what an unbatched call would
return.

When a window goes is dynamic batching, as inference servers do it: a window is due `max_wait_ms`
after its first call (default 0: calls of the same event-loop turn still join), and a due window
is sent at once while fewer than `max_inflight` batches run, else as soon as one finishes; a full
window is sent at once. A lone caller waits for nothing (the former fixed 2 ms timer added 2 ms to
every lone dense search), and under load the calls that arrive while a batch runs become the next
batch. Batches do not run side by side by default: on a CPU both would compete for the same cores
(16 closed-loop callers, 100k passages: 219 and 190 queries/s with one batch at a time, 183 and
171 with the timer alone and no limit, mean batch 15.4 in both — BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from retrieval.types import Passage, Retriever


@dataclass
class _Call:
    """One waiting `search` call."""

    queries: list[str]
    future: asyncio.Future[list[list[Passage]]]


@dataclass
class _Window:
    """The calls collected so far for one k, and the timer that will dispatch them."""

    calls: list[_Call] = field(default_factory=list)
    n_queries: int = 0
    timer: asyncio.TimerHandle | None = None
    due: bool = False  # max_wait_ms has passed: goes when a batch slot is free


class BatchingRetriever:
    """A `Retriever` that merges concurrent calls with equal k into one `inner.search`.

    `batches` counts calls made to `inner`, `calls` the `search` calls served: their ratio is the
    batching achieved.
    """

    def __init__(
        self,
        inner: Retriever,
        max_batch: int = 64,
        max_wait_ms: float = 0.0,
        max_inflight: int = 1,
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0 or max_inflight < 1:
            raise ValueError(
                "need max_batch >= 1, max_wait_ms >= 0 and max_inflight >= 1: "
                f"{max_batch}, {max_wait_ms}, {max_inflight}"
            )
        self.inner = inner
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.max_inflight = max_inflight
        self.batches = 0
        self.calls = 0
        self._running = 0  # batches sent to `inner` and not finished
        self._windows: dict[int, _Window] = {}  # k -> calls waiting for dispatch (oldest first)
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    async def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        if not queries:
            return []
        self.calls += 1
        loop = asyncio.get_running_loop()
        call = _Call(list(queries), loop.create_future())
        window = self._windows.get(k)
        if window is not None and window.n_queries + len(queries) > self.max_batch:
            self._dispatch(k)  # would overflow: send what is waiting, start a new window
            window = None
        if window is None:
            window = self._windows[k] = _Window()
            window.timer = loop.call_later(self.max_wait_s, self._due, k)
        window.calls.append(call)
        window.n_queries += len(queries)
        if window.n_queries >= self.max_batch:
            self._dispatch(k)
        # If this caller is cancelled, only its own future is; the batch task runs on.
        return await call.future

    async def drain(self) -> None:
        """Dispatch every waiting call and wait for all batches (shutdown, tests)."""
        for k in list(self._windows):
            self._dispatch(k)
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _due(self, k: int) -> None:
        """`max_wait_ms` is up for the window of `k`: send it now, or when a batch finishes."""
        window = self._windows.get(k)
        if window is None:
            return
        window.due, window.timer = True, None
        if self._running < self.max_inflight:
            self._dispatch(k)

    def _dispatch(self, k: int) -> None:
        """Start the batch task for the window of `k` (no await: nothing can join in between)."""
        window = self._windows.pop(k, None)
        if window is None:
            return
        if window.timer is not None:
            window.timer.cancel()
        calls = [c for c in window.calls if not c.future.done()]  # drop cancelled callers
        if not calls:
            return
        self.batches += 1
        self._running += 1
        task = asyncio.get_running_loop().create_task(self._run(calls, k))
        self._tasks.add(task)  # keep a reference until done
        task.add_done_callback(self._tasks.discard)

    async def _run(self, calls: list[_Call], k: int) -> None:
        try:
            await self._run_batch(calls, k)
        finally:
            self._running -= 1
            for due_k in [k for k, w in self._windows.items() if w.due]:
                if self._running >= self.max_inflight:
                    break
                self._dispatch(due_k)

    async def _run_batch(self, calls: list[_Call], k: int) -> None:
        queries = [q for c in calls for q in c.queries]
        try:
            results = await self.inner.search(queries, k)
            if len(results) != len(queries):
                name = type(self.inner).__name__
                raise RuntimeError(f"{name}: {len(results)} results for {len(queries)} queries")
        except asyncio.CancelledError:
            for c in calls:
                c.future.cancel()
            raise
        except Exception as exc:  # every caller of the batch gets the backend's error
            for c in calls:
                if not c.future.done():
                    c.future.set_exception(exc)
                    c.future.exception()  # mark retrieved: its caller may be gone meanwhile
            return
        start = 0
        for c in calls:
            end = start + len(c.queries)
            if not c.future.done():  # a caller cancelled while the batch ran
                c.future.set_result(results[start:end])
            start = end
