"""`OpenAIEngine`: the `Engine` seam over a vLLM (or SGLang) OpenAI-compatible server.

Every `generate` call is one streaming `POST {base_url}/v1/completions` whose `prompt` is the
context as token ids, with `stop` (the StopSpec's strings), `stop_token_ids` (its ids plus EOS),
`include_stop_str_in_output: true`, `skip_special_tokens: false` and `return_token_ids: true`.
The server's automatic prefix caching makes each round of the agent loop pay only for new tokens.

Token ids. When the chunks carry `token_ids` (vLLM with `return_token_ids`), those exact ids are
yielded. When they do not (older vLLM, servers without the option), each chunk's text is
re-tokenized with the local tokenizer. That fallback is NOT token-exact: a sampled token sequence
and the tokenization of its text can differ (merges across chunk boundaries, a stop string that
ends inside a token, text the server's detokenizer normalized), so the loop's trajectory — and a
training mask built on it — may drift from what the model sampled. `stats.fallback_chunks` counts
the chunks decoded that way and the first one logs a warning.

Failures. Only connection failures are retried, a few times with exponential backoff: a refused
connection, a connect timeout, or a connection the server closed before any response came (a
pooled keep-alive connection the server had already dropped: "server disconnected without
sending a response"). Nothing was received, so the caller has consumed nothing, and a vLLM whose
client went away aborts whatever it started. Nothing else is retried: not a read timeout (the
server may still be generating), not an HTTP error, not a stream that broke after its response
began. Closing the iterator (aclose, cancellation) closes the HTTP response at once, which drops
the connection; vLLM aborts a request whose client went away.

    EngineError
    ├── EngineConnectionError   the server cannot be reached (after retries) or went away mid-stream
    ├── EngineTimeoutError      connected, but no data within the read timeout
    ├── EngineHTTPError         the server answered an error status (`.status`, its message)
    └── EngineProtocolError     an in-band error frame, or a stream no vLLM server would send
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from agent.engine import SamplingParams, StopSpec, TokenChunk
from agent.tokenizer import Tokenizer

log = logging.getLogger("searchagent.engine")


class EngineError(Exception):
    """A remote engine failed; the message says what and carries the server's own words."""


class EngineConnectionError(EngineError):
    pass


class EngineTimeoutError(EngineError):
    pass


class EngineHTTPError(EngineError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"engine answered HTTP {status}: {message}")
        self.status = status
        self.server_message = message


class EngineProtocolError(EngineError):
    pass


@dataclass
class OpenAIEngineStats:
    requests: int = 0  # generate calls that reached the server
    connect_retries: int = 0  # connection attempts repeated after a connection failure
    fallback_chunks: int = 0  # chunks without token_ids, re-tokenized from text (not exact)


class OpenAIEngine:
    """`base_url` is the server root (`http://host:8000`; a trailing `/v1` is accepted). `model`
    is the name the server serves (see `discover_model`). `max_context` is the server's context
    length when known. `extra_body` adds fields to every request (vLLM's `top_k`, say, or
    `{"agent": False}` when the server is another searchagent); it cannot override the fields
    set here."""

    def __init__(
        self,
        base_url: str,
        tokenizer: Tokenizer,
        model: str,
        *,
        api_key: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 0.25,
        max_context: int | None = None,
        max_connections: int = 256,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.base_url = _root(base_url)
        self.max_context = max_context
        self.retries = retries
        self.backoff_s = backoff_s
        self.stats = OpenAIEngineStats()
        self._extra = dict(extra_body or {})
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # pool=None: a request waits for a free connection rather than failing; the service
        # bounds concurrency itself.
        self._timeout = httpx.Timeout(
            connect=connect_timeout_s, read=read_timeout_s, write=connect_timeout_s, pool=None
        )
        self._limits = httpx.Limits(max_connections=max_connections)
        # a pooled client per event loop, and what closes it as that loop shuts down (and then
        # removes the entry: a weak mapping would not do, as the closer refers to its loop)
        self._clients: dict[
            asyncio.AbstractEventLoop, tuple[httpx.AsyncClient, AsyncGenerator[None, None]]
        ] = {}
        self._warned_fallback = False

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, stop: StopSpec
    ) -> AsyncIterator[TokenChunk]:
        if not prompt_ids:
            raise ValueError("empty prompt")
        stop_ids = frozenset(stop.token_ids) | self.tokenizer.stop_ids
        body = self._body(prompt_ids, params, stop, stop_ids)
        produced = 0
        last_id: int | None = None
        text = ""  # the end of the text received
        async with self._post(body) as response:
            try:
                async with aclosing(_events(response)) as events:
                    async for payload in events:
                        choices = payload.get("choices") or []
                        if not choices:
                            continue  # a usage-only chunk
                        choice = choices[0]
                        ids = self._ids(choice)
                        text = (text + (choice.get("text") or ""))[-_TAIL:]
                        produced += len(ids)
                        last_id = ids[-1] if ids else last_id
                        finish = choice.get("finish_reason")
                        if finish is None:
                            if ids:
                                yield TokenChunk(ids)
                            continue
                        reason = _stop_reason(choice)
                        if choice.get("token_ids") is None:  # re-tokenized text: was it trimmed?
                            ids += self._trimmed_stop(reason, text, last_id)
                        yield _final(ids, finish, reason, last_id, stop_ids)
                        return
            except httpx.TimeoutException as exc:
                raise EngineTimeoutError(
                    f"the engine sent nothing within the read timeout after {produced} tokens"
                ) from exc
            except httpx.TransportError as exc:
                raise EngineConnectionError(
                    f"lost the engine mid-stream after {produced} tokens: {exc!r}"
                ) from exc
        raise EngineProtocolError(
            f"the engine's stream ended after {produced} tokens without a finish_reason"
        )

    async def aclose(self) -> None:
        """Close the running loop's client (another loop's closes as that loop shuts down)."""
        entry = self._clients.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry[1].aclose()  # the closer's `finally` closes the client

    # -- request -----------------------------------------------------------------------------

    def _body(
        self, prompt_ids: list[int], params: SamplingParams, stop: StopSpec, stop_ids: frozenset
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": list(prompt_ids),
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stop": list(stop.strings),
            "stop_token_ids": sorted(stop_ids),
            "include_stop_str_in_output": True,  # the stop is part of the model's text
            "no_stop_trim": True,  # the same for SGLang, which trims it (and its id) otherwise
            "skip_special_tokens": False,  # tags are special tokens; the loop must see them
            "spaces_between_special_tokens": False,  # keeps the fallback's text faithful
            "return_token_ids": True,
            "stream": True,
            "n": 1,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        bias = {str(i): b for i, b in params.logit_bias}
        # -100 bans a token in OpenAI's and vLLM's logit_bias
        bias |= {str(i): -100 for i in sorted(params.banned_ids)}
        if bias:
            body["logit_bias"] = bias
        return self._extra | body  # extras never override what the engine relies on

    async def _client(self) -> httpx.AsyncClient:
        """The running loop's pooled client. A pool's connections belong to the loop that
        opened them, and callers such as evaluation scripts run several loops in turn
        (`asyncio.run` each time). Each client is closed on its own loop as that loop shuts
        down — `asyncio.run` closes the loop's async generators first, `_closed_at_shutdown`
        among them — since once a loop is closed its connections cannot be closed."""
        loop = asyncio.get_running_loop()
        if loop not in self._clients:
            client = httpx.AsyncClient(
                timeout=self._timeout, limits=self._limits, headers=self._headers
            )
            closer = _closed_at_shutdown(client, self._clients, loop)
            self._clients[loop] = (client, closer)
            await anext(closer)  # started: the loop's async-generator hooks know it now
        return self._clients[loop][0]

    @asynccontextmanager
    async def _post(self, body: dict[str, Any]) -> AsyncIterator[httpx.Response]:
        """The streaming response once its status is 200 (connection failures retried)."""
        client = await self._client()
        url = f"{self.base_url}/v1/completions"
        attempt = 0
        while True:
            try:
                request = client.build_request("POST", url, json=body)
                response = await client.send(request, stream=True)
                break
            # raised by `send`, before the status line and headers were whole: no part of the
            # response reached the caller (httpx says "Server disconnected without sending a
            # response" when nothing came at all)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
                if isinstance(exc, httpx.RemoteProtocolError) and _NOTHING_SENT not in str(exc):
                    # a malformed status line or headers: the server (or a proxy) may have run
                    # the request, so sending it again could run it twice
                    raise EngineConnectionError(
                        f"the engine at {self.base_url} sent a malformed response: {exc}"
                    ) from exc
                if attempt >= self.retries:
                    raise EngineConnectionError(
                        f"cannot connect to the engine at {self.base_url} after "
                        f"{attempt + 1} attempts: {exc or type(exc).__name__}"
                    ) from exc
                self.stats.connect_retries += 1
                await asyncio.sleep(self.backoff_s * 2**attempt)
                attempt += 1
            except httpx.TimeoutException as exc:
                raise EngineTimeoutError(
                    f"the engine at {self.base_url} sent no response within the read timeout"
                ) from exc
            except httpx.TransportError as exc:
                raise EngineConnectionError(
                    f"the engine at {self.base_url} failed before answering: {exc!r}"
                ) from exc
        self.stats.requests += 1
        try:
            if response.status_code != 200:
                await response.aread()
                raise EngineHTTPError(response.status_code, _error_message(response))
            yield response
        finally:
            await response.aclose()  # unread body: httpx drops the connection, the server aborts

    def _trimmed_stop(self, reason: int | str | None, text: str, last_id: int | None) -> list[int]:
        """The ids of a stop the server matched but left out of its text (a server that ignores
        both include_stop_str_in_output and no_stop_trim): the tag belongs to the trajectory."""
        if isinstance(reason, str) and reason and not text.endswith(reason):
            return self.tokenizer.encode(reason)
        if (
            isinstance(reason, int)
            and reason != last_id
            and 0 <= reason < self.tokenizer.vocab_size
        ):
            return [reason]
        return []

    def _ids(self, choice: dict[str, Any]) -> list[int]:
        ids = choice.get("token_ids")
        if ids is not None:
            return list(ids)
        text = choice.get("text") or ""
        if not text:
            return []
        self.stats.fallback_chunks += 1
        if not self._warned_fallback:
            self._warned_fallback = True
            log.warning(
                "engine at %s returns no token_ids: re-tokenizing its text, which is not "
                "token-exact (use a vLLM with return_token_ids)",
                self.base_url,
            )
        return self.tokenizer.encode(text)


def discover_model(
    base_url: str, api_key: str | None = None, timeout_s: float = 10.0
) -> tuple[str, int | None]:
    """The first model a server lists at /v1/models and its context length (vLLM's
    `max_model_len`) when given. Blocking: for start-up."""
    url = f"{_root(base_url)}/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.TransportError as exc:
        raise EngineConnectionError(f"cannot reach the engine at {url}: {exc!r}") from exc
    if r.status_code != 200:
        raise EngineHTTPError(r.status_code, _error_message(r))
    try:
        first = r.json()["data"][0]
        return str(first["id"]), first.get("max_model_len")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise EngineProtocolError(f"{url} lists no model ({r.text[:200]!r})") from exc


# how httpx words a connection closed before any byte of the response came
_NOTHING_SENT = "without sending a response"


async def _closed_at_shutdown(
    client: httpx.AsyncClient, clients: dict, loop: asyncio.AbstractEventLoop
) -> AsyncGenerator[None, None]:
    """Suspended for the life of `loop`, which started it; the loop's shutdown
    (`shutdown_asyncgens`, run by `asyncio.run`) closes it, and so the client, on that loop, and
    drops the loop's entry from `clients`."""
    try:
        yield
    finally:
        if clients.get(loop, (None,))[0] is client:
            del clients[loop]
        await client.aclose()


# -- response ---------------------------------------------------------------------------------


async def _events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of an SSE stream (`data: {...}` lines; comments and [DONE] skipped)."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, ": comments", event/id fields
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        try:
            payload = json.loads(data)
        except ValueError as exc:
            raise EngineProtocolError(
                f"the engine sent a frame that is not JSON: {data[:200]!r}"
            ) from exc
        if not isinstance(payload, dict):
            raise EngineProtocolError(f"the engine sent an unexpected frame: {data[:200]!r}")
        if "error" in payload or payload.get("object") == "error":
            raise EngineProtocolError(f"the engine reported an error: {_message_of(payload)}")
        yield payload


_TAIL = 256  # characters of received text kept to see whether it ends with the stop string


def _stop_reason(choice: dict[str, Any]) -> int | str | None:
    # vLLM: stop_reason; SGLang: matched_stop. The stop string or stop token id; None for EOS.
    reason = choice.get("stop_reason", choice.get("matched_stop"))
    return None if isinstance(reason, bool) else reason


def _final(
    ids: list[int], finish: str, reason: int | str | None, last_id: int | None, stop_ids: frozenset
) -> TokenChunk:
    if finish == "length":
        return TokenChunk(ids, "length")
    if finish != "stop":
        raise EngineProtocolError(f"the engine ended the request with finish_reason {finish!r}")
    if isinstance(reason, str):
        return TokenChunk(ids, "stop", stop_str=reason)
    if isinstance(reason, int):
        return TokenChunk(ids, "stop", reason)
    # EOS (vLLM reports no stop_reason for it): the last id says which stop token it was
    return TokenChunk(ids, "stop", last_id if last_id in stop_ids else None)


def _root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def _message_of(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if body.get("detail"):
            return str(body["detail"])
    return json.dumps(body)[:500]


def _error_message(response: httpx.Response) -> str:
    try:
        return _message_of(response.json())
    except ValueError:
        return response.text[:500] or response.reason_phrase
