"""retrieval/cache.py: MemoryCache, RedisCache (real redis-server), CachedRetriever."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
import uuid

import pytest
import redis
from retrieval_wrappers import CountingRetriever, GatedRetriever

from retrieval.bm25 import BM25Retriever
from retrieval.cache import CachedRetriever, MemoryCache, RedisCache
from retrieval.types import Cache, Passage

PEOPLE = [
    {"id": f"p{i}", "title": name, "text": f"{name} is a {job} born in {city}."}
    for i, (name, job, city) in enumerate(
        [
            ("Ada Lind", "painter", "Norvik"),
            ("Borin Kask", "chemist", "Estermoor"),
            ("Cira Moll", "sailor", "Quellstad"),
            ("Dov Tarn", "architect", "Norvik"),
            ("Elsa Quill", "composer", "Palm Harbor"),
            ("Fenn Oort", "painter", "Estermoor"),
            ("Niros Lethzifei", "glassblower", "Varn"),
        ]
    )
]


@pytest.fixture(scope="module")
def bm25() -> BM25Retriever:
    return BM25Retriever.build(PEOPLE)


class FailingRetriever(CountingRetriever):
    async def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        self.record(queries, k)
        raise RuntimeError("backend down")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- MemoryCache -------------------------------------------------------------------------------


def test_memory_cache_is_a_cache():
    """Guards against: MemoryCache drifting from the Cache protocol."""
    assert isinstance(MemoryCache(), Cache)
    assert isinstance(RedisCache("redis://127.0.0.1:1/0"), Cache)


def test_memory_cache_evicts_least_recently_used():
    """Guards against: evicting by insertion order (FIFO), which drops hot entries first, or
    growing without bound."""

    async def main():
        cache = MemoryCache(max_items=2)
        await cache.set_many({"a": 1, "b": 2})
        assert await cache.get_many(["a"]) == [1]  # "a" is now more recent than "b"
        await cache.set_many({"c": 3})
        assert await cache.get_many(["a", "b", "c"]) == [1, None, 3]
        assert len(cache) == 2

    asyncio.run(main())


def test_memory_cache_ttl_expires_per_set():
    """Guards against: TTL ignored, or one set's TTL applied to entries stored without one."""

    async def main():
        clock = FakeClock()
        cache = MemoryCache(clock=clock)
        await cache.set_many({"short": [1]}, ttl_s=10)
        await cache.set_many({"forever": [2]})
        clock.now += 9.9
        assert await cache.get_many(["short", "forever"]) == [[1], [2]]
        clock.now += 0.2
        assert await cache.get_many(["short", "forever"]) == [None, [2]]
        assert len(cache) == 1  # the expired entry is gone, not just hidden

    asyncio.run(main())


def test_non_positive_ttl_is_rejected():
    """Guards against: ttl_s=0 meaning "forever" in one cache and "never" in the other."""
    with pytest.raises(ValueError):
        asyncio.run(MemoryCache().set_many({"a": 1}, ttl_s=0))
    with pytest.raises(ValueError):
        CachedRetriever(CountingRetriever(None), MemoryCache(), "ns", ttl_s=-1)


# --- CachedRetriever ---------------------------------------------------------------------------


def test_second_call_is_a_hit_and_skips_the_backend(bm25):
    """Guards against: a cache that stores but never answers, or answers with altered passages."""

    async def main():
        inner = CountingRetriever(bm25)
        cached = CachedRetriever(inner, MemoryCache(), namespace="fp:bm25")
        first = await cached.search(["Cira Moll"], 3)
        second = await cached.search(["  cira   MOLL "], 3)  # same normalized query
        assert first == second == await bm25.search(["cira moll"], 3)
        assert first[0][0].id == "p2"
        assert inner.queries == [["Cira Moll"]]  # the first spelling, as written
        assert (cached.hits, cached.misses) == (1, 1)
        await cached.search(["Cira Moll"], 2)  # k is part of the key
        assert len(inner.calls) == 2

    asyncio.run(main())


def test_misses_only_are_searched_in_one_call_and_order_is_kept(bm25):
    """Guards against: re-searching cached queries, one backend call per query, or results
    landing on the wrong query when hits and misses interleave."""

    async def main():
        inner = CountingRetriever(bm25)
        cached = CachedRetriever(inner, MemoryCache(), namespace="fp:bm25")
        await cached.search(["Dov Tarn"], 2)
        results = await cached.search(["Ada Lind", "Dov Tarn", "Fenn Oort"], 2)
        assert [r[0].id for r in results] == ["p0", "p3", "p5"]
        assert inner.queries == [["Dov Tarn"], ["Ada Lind", "Fenn Oort"]]

    asyncio.run(main())


def test_duplicate_queries_in_a_batch_are_searched_once(bm25):
    """Guards against: paying the backend twice for the same query within one batch."""

    async def main():
        inner = CountingRetriever(bm25)
        cached = CachedRetriever(inner, MemoryCache(), namespace="fp:bm25")
        results = await cached.search(["Ada Lind", "Borin Kask", "ADA LIND", "ada lind"], 2)
        assert [r[0].id for r in results] == ["p0", "p1", "p0", "p0"]
        assert inner.queries == [["Ada Lind", "Borin Kask"]]
        assert cached.misses == 2

    asyncio.run(main())


def test_concurrent_identical_misses_make_one_backend_call(bm25):
    """Guards against: a thundering herd — N concurrent requests for an uncached query each
    hitting the backend before the first result is stored (no single-flight)."""

    async def main():
        inner = GatedRetriever(bm25)
        cached = CachedRetriever(inner, MemoryCache(), namespace="fp:bm25")
        # Tasks run in creation order: both look the query up before the gated search returns.
        first = asyncio.create_task(cached.search(["Elsa Quill"], 2))
        second = asyncio.create_task(cached.search(["elsa quill", "Ada Lind"], 2))
        await inner.entered.wait()
        inner.gate.set()
        r1, r2 = await asyncio.gather(first, second)
        assert r1[0][0].id == r2[0][0].id == "p4"
        assert r2[1][0].id == "p0"
        assert inner.queries == [["Elsa Quill"], ["Ada Lind"]]

    asyncio.run(main())


def test_backend_is_asked_the_query_as_written_and_keyed_on_the_normalized_one(bm25):
    """Guards against the backend being sent the lower-cased, whitespace-collapsed cache key
    ("niros lethzifei") instead of what the caller wrote: a cased backend (web search, a cased
    encoder) loses the case. Spellings still share one key, one in-flight search and one entry."""

    async def main():
        inner = GatedRetriever(bm25)
        cached = CachedRetriever(inner, MemoryCache(), namespace="fp:bm25")
        first = asyncio.create_task(cached.search(["  Niros \t LETHZIFEI ", "Ada Lind"], 2))
        second = asyncio.create_task(cached.search(["niros lethzifei"], 2))  # joins the first
        await inner.entered.wait()
        inner.gate.set()
        r1, r2 = await asyncio.gather(first, second)
        assert inner.queries == [["Niros LETHZIFEI", "Ada Lind"]]
        assert r1[0] == r2[0] and r1[0][0].id == "p6"
        await cached.drain()
        assert (await cached.search(["NIROS  lethzifei"], 2))[0][0].id == "p6"  # a cache hit
        assert len(inner.calls) == 1

    asyncio.run(main())


def test_entries_are_compact_rows_under_a_versioned_key(bm25):
    """Guards against storing each passage through `dataclasses.asdict` (a recursive deep copy
    per passage, ~20x slower than building a row), and against misreading an entry of another
    shape (the v1 dict per passage) instead of treating it as a miss."""

    async def main():
        cache = MemoryCache()
        inner = CountingRetriever(bm25)
        cached = CachedRetriever(inner, cache, namespace="fp:bm25")
        [want] = await cached.search(["Elsa Quill"], 2)
        await cached.drain()
        [rows] = await cache.get_many([cached.key("Elsa Quill", 2)])
        assert [list(row) for row in rows] == [[p.id, p.title, p.text, p.score] for p in want]
        v1 = [{"id": p.id, "title": p.title, "text": p.text, "score": p.score} for p in want]
        await cache.set_many({cached.key("Elsa Quill", 2): v1})
        assert await cached.search(["Elsa Quill"], 2) == [want]  # a miss: searched again
        assert len(inner.calls) == 2

    asyncio.run(main())


def test_cancelled_first_caller_does_not_strand_the_others(bm25):
    """Guards against: a client disconnect cancelling the shared in-flight search, so requests
    that joined it fail with CancelledError or hang forever."""

    async def main():
        inner = GatedRetriever(bm25)
        cached = CachedRetriever(inner, MemoryCache(), namespace="fp:bm25")
        first = asyncio.create_task(cached.search(["Fenn Oort"], 2))
        second = asyncio.create_task(cached.search(["Fenn Oort"], 2))
        await inner.entered.wait()
        first.cancel()
        inner.gate.set()
        [[top, *_]] = await second
        assert top.id == "p5"
        assert first.cancelled()
        assert len(inner.calls) == 1

    asyncio.run(main())


def test_backend_error_reaches_every_waiter_and_is_not_cached():
    """Guards against: a failed search poisoning the cache, or leaving its key in flight forever."""

    async def main():
        inner = FailingRetriever(None)
        cached = CachedRetriever(inner, MemoryCache(), namespace="fp:bm25")
        results = await asyncio.gather(
            cached.search(["Ada Lind"], 2), cached.search(["Ada Lind"], 2), return_exceptions=True
        )
        assert [str(r) for r in results] == ["backend down", "backend down"]
        with pytest.raises(RuntimeError):
            await cached.search(["Ada Lind"], 2)
        assert len(inner.calls) == 2

    asyncio.run(main())


# --- RedisCache (real redis-server) ------------------------------------------------------------


def test_redis_round_trip_stores_json(redis_url):
    """Guards against: values that do not survive the trip, keys without our prefix, or values
    stored in a non-JSON encoding (pickle) another replica or language cannot read."""
    prefix = f"test:{uuid.uuid4().hex}:"

    async def main():
        cache = RedisCache(redis_url, prefix=prefix)
        value = [{"id": "p1", "title": "Ada Lind", "text": "Ünïcode ok", "score": 1.25}]
        await cache.set_many({"k1": value, "k2": {"n": 2}})
        assert await cache.get_many(["k1", "missing", "k2"]) == [value, None, {"n": 2}]
        assert cache.errors == 0
        await cache.aclose()

    asyncio.run(main())
    with redis.Redis.from_url(redis_url) as client:
        raw = client.get(prefix + "k1")
    assert json.loads(raw)[0]["title"] == "Ada Lind"


def test_redis_ttl_is_set(redis_url):
    """Guards against: entries stored without expiry when a TTL was asked for (unbounded growth)."""
    prefix = f"test:{uuid.uuid4().hex}:"

    async def main():
        cache = RedisCache(redis_url, prefix=prefix)
        await cache.set_many({"short": 1}, ttl_s=30)
        await cache.set_many({"forever": 2})
        await cache.aclose()

    asyncio.run(main())
    with redis.Redis.from_url(redis_url) as client:
        assert 0 < client.ttl(prefix + "short") <= 30
        assert client.ttl(prefix + "forever") == -1  # exists, no expiry


def test_cached_retriever_over_redis(redis_url, bm25):
    """Guards against: CachedRetriever and RedisCache disagreeing on the stored passage shape."""

    async def main():
        inner = CountingRetriever(bm25)
        cache = RedisCache(redis_url, prefix=f"test:{uuid.uuid4().hex}:")
        cached = CachedRetriever(inner, cache, namespace="fp:bm25", ttl_s=60)
        first = await cached.search(["Borin Kask"], 3)
        second = await cached.search(["Borin Kask"], 3)
        assert first == second and first[0][0].id == "p1"
        assert len(inner.calls) == 1
        await cache.aclose()

    asyncio.run(main())


def test_a_fast_failure_in_flight_does_not_close_a_breaker_a_timeout_opened(redis_server):
    """Guards against an operation that started before a timeout opened the breaker and then
    failed fast (redis-py raises "max number of clients reached" and "loading" as connection
    errors) closing the breaker again, so that every request goes back to paying a timeout."""

    async def main():
        cache = RedisCache(redis_server.url, f"test:{uuid.uuid4().hex}:", 0.3, cooldown_s=30)
        sent, release = asyncio.Event(), asyncio.Event()

        async def refused_late():
            sent.set()
            await release.wait()
            raise redis.exceptions.ConnectionError("max number of clients reached")

        in_flight = asyncio.create_task(cache._guarded("MGET", refused_late))
        await sent.wait()  # it is past the breaker's check, waiting on its reply
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            assert await cache.get_many(["a"]) == [None]  # timed out: the breaker opens
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        release.set()
        assert await in_flight is None
        start = time.monotonic()
        assert await cache.get_many(["a"]) == [None]  # skipped, Redis not asked
        assert time.monotonic() - start < 0.05 and cache.errors == 3
        await cache.aclose()

    asyncio.run(main())


def test_dead_redis_means_misses_not_failures(bm25):
    """Guards against: a Redis outage failing requests (exceptions) or stalling them in retries;
    the cache must count the error, miss, and let retrieval go on."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]

    async def main():
        cache = RedisCache(f"redis://127.0.0.1:{dead_port}/0")
        assert await cache.get_many(["a", "b"]) == [None, None]
        await cache.set_many({"a": 1}, ttl_s=5)
        assert cache.errors == 2
        inner = CountingRetriever(bm25)
        cached = CachedRetriever(inner, cache, namespace="fp:bm25")
        [[top, *_]] = await cached.search(["Dov Tarn"], 2)
        assert top.id == "p3"
        await cached.drain()  # results are returned before the cache write finishes
        assert cache.errors == 4  # one failed MGET, one failed SET pipeline
        await cache.aclose()

    asyncio.run(main())


def test_paused_redis_costs_one_timeout_then_is_skipped_for_the_cooldown(redis_server, bm25):
    """Guards against a slow or paused Redis (SIGSTOP) adding a timeout — twice, with redis-py
    retrying it — to every search: after one timeout the cache is skipped (each skip counted as an
    error) for the cool-down, one probe then tries Redis while other calls keep skipping it, and
    once Redis answers again its entries are hits."""
    timeout_s, cooldown_s = 0.3, 1.0

    async def main():
        cache = RedisCache(
            redis_server.url, f"test:{uuid.uuid4().hex}:", timeout_s, cooldown_s=cooldown_s
        )
        inner = CountingRetriever(bm25)
        cached = CachedRetriever(inner, cache, namespace="fp:bm25", ttl_s=60)
        want = await cached.search(["Ada Lind"], 2)
        await cached.drain()  # stored while Redis was well
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            assert await cached.search(["Ada Lind"], 2) == want  # MGET timed out: a miss
            start = time.monotonic()
            for i in range(10):  # distinct keys: a repeated one would join the pending write
                [[top, *_]] = await cached.search([f"Ada Lind {i}"], 2)
                assert top.id == "p0"
            await cached.drain()
            elapsed = time.monotonic() - start
            assert elapsed < 2 * timeout_s, f"10 searches took {elapsed:.2f} s"  # not 10 timeouts
            assert cache.errors == 22  # 1 MGET timed out; 1 SET + 10 MGET + 10 SET skipped
            assert len(inner.calls) == 12  # the cache was bypassed, not answered from

            await asyncio.sleep(cooldown_s)  # cool-down over, Redis still paused
            probe = asyncio.create_task(cached.search(["Ada Lind"], 2))
            other = asyncio.create_task(cached.search(["Ada Lind"], 2))
            done, _ = await asyncio.wait({probe, other}, return_when=asyncio.FIRST_COMPLETED)
            assert done == {other}  # skipped Redis while the probe waited on it
            assert await probe == want  # the probe timed out: the breaker is open again
            await cached.drain()
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        await asyncio.sleep(cooldown_s)
        errors, calls = cache.errors, len(inner.calls)
        assert await cached.search(["Ada Lind"], 2) == want
        assert (cached.hits, len(inner.calls), cache.errors) == (1, calls, errors)  # a hit again
        await cache.aclose()

    asyncio.run(main())
