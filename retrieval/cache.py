"""Result caches and `CachedRetriever`, which puts one in front of any `Retriever`.

- `MemoryCache`: in-process LRU with a per-entry TTL; the embedded default.
- `RedisCache`: shared by service replicas; values are JSON (never pickle). Every Redis error is
  counted in `errors`, logged (at most one warning per 10 s) and turned into a miss or a skipped
  write: a cache failure never fails a request. A Redis that times out is skipped for a cool-down
  (a circuit breaker), so a paused or overloaded Redis costs one timeout, not one per request.
- `CachedRetriever`: one `get_many` for a batch, one `inner.search` for its misses, one `set_many`
  for the results; duplicate queries in a batch and identical misses in concurrent calls collapse
  into one backend search (single-flight). Entries are `[id, title, text, score]` rows.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from retrieval.types import Cache, Passage, Retriever

log = logging.getLogger(__name__)

_WARN_EVERY_S = 10.0
_Pending = asyncio.Future[list[Passage]]  # one in-flight backend search for one cache key
# Part of every cache key: bump it when the stored value's shape changes, so entries written in the
# old shape (v1: one `asdict(Passage)` per passage) are misses instead of being misread.
_FORMAT = "rows/2"


def _check_ttl(ttl_s: float | None) -> None:
    if ttl_s is not None and not ttl_s > 0:
        raise ValueError(f"ttl_s must be positive or None, got {ttl_s!r}")


class MemoryCache:
    """LRU over an OrderedDict, oldest first. Values are stored as given: treat as read-only."""

    def __init__(self, max_items: int = 10_000, *, clock: Callable[[], float] = time.monotonic):
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.max_items = max_items
        self._clock = clock
        # key -> (expiry on `clock`, or None; value)
        self._items: OrderedDict[str, tuple[float | None, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    async def get_many(self, keys: list[str]) -> list[Any | None]:
        now = self._clock()
        out: list[Any | None] = []
        for key in keys:
            entry = self._items.get(key)
            if entry is not None and entry[0] is not None and now >= entry[0]:
                del self._items[key]
                entry = None
            if entry is not None:
                self._items.move_to_end(key)
            out.append(None if entry is None else entry[1])
        return out

    async def set_many(self, items: dict[str, Any], ttl_s: float | None = None) -> None:
        _check_ttl(ttl_s)
        expiry = None if ttl_s is None else self._clock() + ttl_s
        for key, value in items.items():
            self._items[key] = (expiry, value)
            self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)


class RedisCache:
    """Redis-backed cache: `MGET` to read, one pipeline of `SET key value EX ttl` to write.

    Circuit breaker: after an operation times out, Redis is not asked again for `cooldown_s`;
    every operation skipped meanwhile counts in `errors` and is a miss (or an unwritten entry).
    Then one operation probes Redis while the others keep skipping it, and its outcome closes the
    breaker or opens it again. Fast failures (connection refused, a reset) cost no waiting and do
    not open it, so a restarted Redis is used again at once.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "searchagent:",
        socket_timeout_s: float = 0.25,
        cooldown_s: float = 1.0,
    ):
        if not cooldown_s >= 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s!r}")
        self.prefix = prefix
        self.cooldown_s = cooldown_s
        self.errors = 0
        self._last_warning = -math.inf
        self._open_until = -math.inf  # `time.monotonic()` until which Redis is skipped
        self._probing = False  # the cool-down is over and one operation is trying Redis
        # Fail fast: one immediate retry on a connection error (a pooled connection may be stale
        # after a Redis restart), none on a timeout (a Redis that just made us wait will again),
        # not redis-py's default of 3 retries with exponential backoff.
        self._client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )

    async def get_many(self, keys: list[str]) -> list[Any | None]:
        if not keys:
            return []
        names = [self.prefix + key for key in keys]
        raw = await self._guarded("MGET", lambda: self._client.mget(names))
        if raw is None:
            return [None] * len(keys)
        return [self._decode(value) for value in raw]

    async def set_many(self, items: dict[str, Any], ttl_s: float | None = None) -> None:
        """Store JSON-encoded values; `ttl_s` is rounded up to whole seconds (Redis `EX`)."""
        _check_ttl(ttl_s)
        if not items:
            return
        ex = None if ttl_s is None else math.ceil(ttl_s)
        encoded = {self.prefix + k: json.dumps(v, separators=(",", ":")) for k, v in items.items()}

        async def write() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, value in encoded.items():
                    pipe.set(key, value, ex=ex)
                return await pipe.execute()

        await self._guarded("SET", write)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _guarded(self, op: str, call: Callable[[], Awaitable[Any]]) -> Any | None:
        """`await call()` through the circuit breaker; `None` when skipped or failed."""
        if self._probing or time.monotonic() < self._open_until:
            self.errors += 1  # bypassed, as a failure would be, but without the wait
            return None
        probe = self._open_until > -math.inf
        self._probing = probe
        try:
            result = await call()
        except (RedisError, OSError) as exc:
            if isinstance(exc, (RedisTimeoutError, TimeoutError)):
                self._open_until = time.monotonic() + self.cooldown_s
            elif probe:  # Redis answered the probe at once (if with an error): close it
                self._open_until = -math.inf
            # else a fast failure of an operation already in flight (max clients reached, still
            # loading) leaves the breaker as it is: it must not close one a timeout just opened
            self._failed(op, exc)
            return None
        finally:
            if probe:
                self._probing = False
        self._open_until = -math.inf
        return result

    def _decode(self, value: bytes | None) -> Any | None:
        if value is None:
            return None
        try:
            return json.loads(value)
        except ValueError as exc:  # not ours, or truncated: a miss, to be overwritten
            self._failed("decode", exc)
            return None

    def _failed(self, op: str, exc: Exception) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            skip = self._open_until - now
            log.warning(
                "redis cache %s failed, bypassing the cache%s (%s: %s; %d errors so far)",
                op,
                f" for {skip:.1f} s" if skip > 0 else "",
                type(exc).__name__,
                exc,
                self.errors,
            )


def normalize_query(query: str) -> str:
    """Case and whitespace do not make a different query."""
    return " ".join(query.lower().split())


class CachedRetriever:
    """A `Retriever` that answers from `cache` first; `namespace` should name the index and backend.

    `hits` counts distinct queries of a call answered without a backend search of its own (from
    the cache, or by joining another call's in-flight search); `misses` counts those searched.
    Keys use the normalized query, but the backend is asked for the query as written (stripped,
    runs of whitespace collapsed): a cased backend (web search, a cased encoder) sees the case the
    user wrote. Spellings that share a key share the result of whichever was searched first.
    """

    def __init__(self, inner: Retriever, cache: Cache, namespace: str, ttl_s: float | None = None):
        _check_ttl(ttl_s)
        self.inner = inner
        self.cache = cache
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.hits = 0
        self.misses = 0
        self.cache_errors = 0  # exceptions raised by `cache` itself (ours never raise)
        self._inflight: dict[str, _Pending] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def drain(self) -> None:
        """Wait until every in-flight search and its cache write is done (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def key(self, query: str, k: int) -> str:
        payload = json.dumps([_FORMAT, self.namespace, k, normalize_query(query)])
        return hashlib.sha256(payload.encode()).hexdigest()

    async def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        if not queries:
            return []
        keys = [self.key(q, k) for q in queries]
        unique: dict[str, str] = {}  # key -> the first spelling of it, which is what is searched
        for key, query in zip(keys, queries, strict=True):
            unique.setdefault(key, " ".join(query.split()))
        waiting = {key: self._inflight[key] for key in unique if key in self._inflight}
        lookup = [key for key in unique if key not in waiting]
        found: dict[str, list[Passage]] = {}
        for key, value in zip(lookup, await self._cache_get(lookup), strict=True):
            passages = _decode(value)
            if passages is not None:
                found[key] = passages
            elif key in self._inflight:  # another call started it while we read the cache
                waiting[key] = self._inflight[key]
        misses = {key: unique[key] for key in lookup if key not in found and key not in waiting}
        self.hits += len(unique) - len(misses)
        self.misses += len(misses)
        if misses:
            waiting.update(self._start_fetch(misses, k))
        for key, future in waiting.items():
            # shield: a caller that is cancelled must not cancel the future others wait on
            found[key] = await asyncio.shield(future)
        return [list(found[key]) for key in keys]

    def _start_fetch(self, misses: dict[str, str], k: int) -> dict[str, _Pending]:
        """Register futures for `misses` (no await before this, so no race) and search in a task."""
        loop = asyncio.get_running_loop()
        futures: dict[str, _Pending] = {key: loop.create_future() for key in misses}
        self._inflight.update(futures)
        task = loop.create_task(self._fetch(misses, k, futures))
        self._tasks.add(task)  # keep a reference until done
        task.add_done_callback(self._tasks.discard)
        return futures

    async def _fetch(self, misses: dict[str, str], k: int, futures: dict[str, _Pending]) -> None:
        """The one backend call for `misses`. Runs as its own task, so when the caller that started
        it is cancelled (client disconnect), the callers that joined it still get their results."""
        try:
            try:
                results = await self.inner.search(list(misses.values()), k)
                if len(results) != len(misses):
                    name = type(self.inner).__name__
                    raise RuntimeError(f"{name}: {len(results)} results for {len(misses)} queries")
            except asyncio.CancelledError:
                for future in futures.values():
                    future.cancel()
                raise
            except Exception as exc:  # every waiter gets the backend's error; nothing is cached
                for future in futures.values():
                    future.set_exception(exc)
                    future.exception()  # mark retrieved: all its waiters may have been cancelled
                return
            for key, passages in zip(misses, results, strict=True):
                futures[key].set_result(passages)
            # Stay in-flight until stored, so a call arriving meanwhile joins instead of searching.
            stored = {key: _rows(r) for key, r in zip(misses, results, strict=True)}
            await self._cache_set(stored)
        finally:
            for key, future in futures.items():
                if self._inflight.get(key) is future:
                    del self._inflight[key]

    async def _cache_get(self, keys: list[str]) -> list[Any | None]:
        if not keys:
            return []
        try:
            return await self.cache.get_many(keys)
        except Exception:
            self.cache_errors += 1
            log.warning("cache get_many failed; searching without the cache", exc_info=True)
            return [None] * len(keys)

    async def _cache_set(self, items: dict[str, Any]) -> None:
        try:
            await self.cache.set_many(items, self.ttl_s)
        except Exception:
            self.cache_errors += 1
            log.warning("cache set_many failed; results not cached", exc_info=True)


def _rows(passages: list[Passage]) -> list[tuple[str, str, str, float]]:
    """What is cached for one query: a row per passage (no `asdict`, which deep-copies each)."""
    return [(p.id, p.title, p.text, p.score) for p in passages]


def _decode(value: Any) -> list[Passage] | None:
    """Cached rows (lists once through JSON) back into `Passage`s; anything malformed is a miss."""
    if not isinstance(value, list | tuple):
        return None
    passages = []
    for row in value:
        if not isinstance(row, list | tuple) or len(row) != 4:
            return None
        doc_id, title, text, score = row
        try:
            passages.append(Passage(str(doc_id), title, text, float(score)))
        except (TypeError, ValueError):
            return None
    return passages
