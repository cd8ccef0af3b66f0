"""Graceful shutdown with an end the client can read.

On SIGTERM uvicorn stops accepting connections and waits `drain_timeout_s` for running requests;
at that limit it cancels what is left, and a client mid-stream sees its connection cut (httpx:
`RemoteProtocolError`) with no word why. Here the server tells the app when the drain begins
(`DrainingServer.handle_exit` -> `Drain.begin`), and `DrainDeadline` ends each generation
request still running just before uvicorn's limit, itself:

    not answered yet   -> 503 `service_unavailable`, an OpenAI error body (safe to retry elsewhere)
    streaming (SSE)    -> one error frame, then `data: [DONE]`, then the response ends
    answer being sent  -> nothing to add; it finishes or uvicorn closes it

The request's work is cancelled first (its agent run and engine row are freed, as when a
client leaves).
"""

from __future__ import annotations

import asyncio
import json
import signal
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body
from service.middleware import GENERATION_PATHS, send_error

SHUTDOWN_MESSAGE = (
    "The server is shutting down and this request did not finish within its drain timeout. "
    "Retry it."
)


class Drain:
    """When the drain began and when running requests must end: `margin` before uvicorn's own
    limit (it starts counting a little after the signal, so the margin only grows)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due: asyncio.Event | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called in the serving loop at start-up (the lifespan)."""
        self._loop, self._due = loop, asyncio.Event()

    def begin(self) -> None:
        """The drain starts now. Safe from a signal handler: the loop is only asked to act."""
        if self.draining or self._loop is None:
            return
        self.draining = True
        margin = min(1.0, 0.1 * self.seconds)
        self._loop.call_soon_threadsafe(self._loop.call_later, self.seconds - margin, self._set)

    def _set(self) -> None:
        assert self._due is not None
        self._due.set()

    async def due(self) -> None:
        """Returns when running requests must end (never, outside a drain)."""
        if self._due is None:
            await asyncio.Future()  # not serving: nothing to wait for
        assert self._due is not None
        await self._due.wait()


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling `drain` when an exit signal starts the graceful shutdown."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig in (signal.SIGINT, signal.SIGTERM):
            self.drain.begin()
        super().handle_exit(sig, frame)


class DrainDeadline:
    """Ends a generation request still running when `drain.due()` returns (see the module)."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not (scope["type"] == "http" and scope["path"] in GENERATION_PATHS):
            await self.app(scope, receive, send)
            return
        started = stream = ended = False

        async def watch(message: Message) -> None:
            nonlocal started, stream, ended
            if message["type"] == "http.response.start":
                started = True
                kind = dict(message.get("headers", [])).get(b"content-type", b"")
                stream = kind.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                ended = True
            await send(message)

        work = asyncio.ensure_future(self.app(scope, receive, watch))
        due = asyncio.ensure_future(self.drain.due())
        try:
            await asyncio.wait({work, due}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            due.cancel()
            if not work.done():
                work.cancel()  # the deadline came, or this request itself was cancelled
                await asyncio.gather(work, return_exceptions=True)
        if due.done() and not due.cancelled():  # the deadline came first
            cut = work.cancelled() or work.exception() is not None
        else:
            work.result()  # it finished on its own: its error, if any, is the app's to handle
            return
        if ended or not cut:
            return
        if not started:
            await send_error(send, 503, SHUTDOWN_MESSAGE, "service_unavailable", "shutting_down")
        elif stream:
            body = error_body(SHUTDOWN_MESSAGE, "service_unavailable", None, "shutting_down")
            frames = f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()
            await send({"type": "http.response.body", "body": frames, "more_body": False})
