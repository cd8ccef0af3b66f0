"""Pure ASGI middleware: request ids and JSON request logs, API keys, body size, admission.

Pure ASGI (not `BaseHTTPMiddleware`) so streaming responses and client disconnects pass through
untouched. Outermost first, as `service.app.create_app` installs them:

    RequestLog (ids, metrics, logs) -> CORS -> ApiKeys -> BodyLimit -> DrainDeadline
    (`service.drain`: the end of a SIGTERM drain) -> Admission -> routes

Each refusal is an OpenAI-shaped error body with the status vLLM and OpenAI use: 401 for a
missing or wrong key, 413 for a body over the limit, 429 (with `Retry-After`) when every
generation slot is taken and the queue is full.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body
from service.metrics import Metrics

log = logging.getLogger("searchagent.access")

REQUEST_ID_HEADER = b"x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")  # a client id we echo and log as is
# probes and scrapes need no key, nor the playground page (it holds no secrets: the user types
# the key into it, and its API calls carry it)
OPEN_PATHS = frozenset({"/", "/health", "/ready", "/metrics"})
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


async def send_error(
    send: Send,
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """A complete JSON error response, sent straight from middleware."""
    body = json.dumps(error_body(message, type_, None, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class RequestLog:
    """Honours a well-formed `X-Request-ID` (else makes one), echoes it on the response, and,
    once the last byte is sent (a stream is timed to [DONE]), counts and times the request in
    `metrics` by route and status and logs one JSON line: id, method, path, status, duration. No
    headers, bodies or query strings are logged (they may hold keys or user text). Paths that
    are not `routes` share the route label "other" (bounded cardinality)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = (_header(scope, REQUEST_ID_HEADER) or b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message.get("headers", []) if h[0] != REQUEST_ID_HEADER]
                headers.append((REQUEST_ID_HEADER, request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            route = scope["path"] if scope["path"] in self.routes else "other"
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.latency.labels(route=route).observe(seconds)
            log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(seconds * 1000, 2),
                },
            )


def _preflight(scope: Scope) -> bool:
    """A CORS preflight: browsers send it without credentials, and it never reaches a route."""
    return (
        scope["method"] == "OPTIONS"
        and _header(scope, b"origin") is not None
        and _header(scope, b"access-control-request-method") is not None
    )


class ApiKeys:
    """Bearer keys: every path but the probes, `/metrics` and the playground page `/` needs one
    of `keys`. Each presented key is compared with every configured key in constant time
    (`hmac.compare_digest`), so the time taken says nothing about how much of a key was right or
    which key matched."""

    def __init__(self, app: ASGIApp, keys: Iterable[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    def _allowed(self, scope: Scope) -> bool:
        header = _header(scope, b"authorization") or b""
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(token, key)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or _preflight(scope):
            await self.app(scope, receive, send)
            return
        if not self._allowed(scope):
            await send_error(
                send,
                401,
                "Incorrect or missing API key. Send it as `Authorization: Bearer <key>`.",
                "invalid_request_error",
                "invalid_api_key",
                headers=[(b"www-authenticate", b"Bearer")],
            )
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses a request body over `max_bytes` with 413: at once from `Content-Length`; a body
    sent without one (chunked) is read here first, up to the limit, and handed on whole (the
    framework would otherwise turn a failure while reading into a generic 400)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _too_large(self, send: Send) -> None:
        await send_error(
            send,
            413,
            f"Request body too large: the limit is {self.max_bytes} bytes.",
            "invalid_request_error",
            "request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                await self._too_large(send)
                return
            await self.app(scope, receive, send)  # the server holds the body to its length
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later: the disconnect message

        await self.app(scope, replay, send)


class ClientLeft(Exception):
    """The client disconnected while its request waited for a slot."""


class Admission:
    """At most `max_running` generation requests at once, `max_queued` more waiting (first come,
    first served); beyond that a 429 with `Retry-After` at once, so clients back off instead of
    piling up. A slot is held until the response's last byte, streams included. Other routes
    (probes, metrics, retrieval, models) are never queued."""

    def __init__(
        self, app: ASGIApp, max_running: int, max_queued: int, metrics: object, retry_after_s: int
    ) -> None:
        self.app = app
        self.max_running = max_running
        self.max_queued = max_queued
        self.retry_after = str(retry_after_s).encode()
        self.metrics = metrics
        self.running = 0
        self.queued = 0
        self._slots: asyncio.Semaphore | None = None  # made on first use, in the server's loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        http = scope["type"] == "http"
        if not (http and scope["path"] in GENERATION_PATHS and scope["method"] == "POST"):
            await self.app(scope, receive, send)
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_running)
        if self.running >= self.max_running and self.queued >= self.max_queued:
            self.metrics.rejected.inc()
            await send_error(
                send,
                429,
                f"The server is busy: {self.running} requests running and {self.queued} queued. "
                "Retry later.",
                "rate_limit_error",
                "server_overloaded",
                headers=[(b"retry-after", self.retry_after)],
            )
            return
        self.queued += 1
        self.metrics.waiting.inc()
        listener: asyncio.Future | None = None
        try:
            if self._slots.locked():  # it waits: a client that leaves meanwhile frees its place
                receive, listener = await self._wait_for_slot(receive)
            else:
                await self._slots.acquire()
        except ClientLeft:
            # nobody reads it; RequestLog records the 499
            await send_error(
                send, 499, "the client closed the request while it was queued",
                "client_closed_request",
            )  # fmt: skip
            return
        finally:
            self.queued -= 1
            self.metrics.waiting.dec()
        self.running += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.running -= 1
            self._slots.release()
            if listener is not None:
                listener.cancel()  # still waiting for a disconnect that no one will read

    async def _wait_for_slot(self, receive: Receive) -> tuple[Receive, asyncio.Future]:
        """Acquire a slot while listening to the client: its body, then (as the app would) for
        it leaving. Returns the `receive` the app gets, which hands over what was read and goes
        on through the same listener, so the server's `receive` is never awaited twice at once.
        Raises ClientLeft, holding no slot, when the client disconnects before one is free; else
        returns that `receive` and the listener, for the caller to cancel once the app is done."""
        assert self._slots is not None
        read: list[Message] = []

        async def listen() -> None:
            while True:
                message = await receive()
                read.append(message)
                if message["type"] != "http.request":  # http.disconnect: nothing comes after
                    return

        slot = asyncio.ensure_future(self._slots.acquire())
        listener = asyncio.ensure_future(listen())

        def give_back() -> None:
            if slot.done() and not slot.cancelled():
                self._slots.release()  # acquired just as the wait ended
            else:
                slot.cancel()

        try:
            await asyncio.wait({slot, listener}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled (server shutdown): hold no slot, leave no task
            give_back()
            listener.cancel()
            raise
        if listener.done():  # the client left (or the listener failed) before a slot was free
            give_back()
            raise ClientLeft

        async def replay() -> Message:
            if not read and not listener.done():
                await listener  # returns when the client leaves
            if read:
                return read.pop(0)
            return await receive()

        return replay, listener


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message, and any `extra` fields."""

    _STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
    converter = time.gmtime  # timestamps in UTC, as the trailing Z says

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry |= {k: v for k, v in vars(record).items() if k not in self._STANDARD}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def json_logging(level: str) -> dict:
    """A `logging.config.dictConfig` (also uvicorn's `log_config`): JSON lines on stderr for our
    loggers and uvicorn's; uvicorn's own access log is off (`RequestLog` writes ours)."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": handler},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"level": level.upper()},
            "uvicorn.access": {"level": "WARNING"},
        },
    }
