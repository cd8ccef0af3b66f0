"""Benchmark: the retrieval layer on a generated corpus — latency, micro-batching, caches, recall.

Builds a corpus of N passages from generated worlds (`training.world`, seeds 0, 1, 2, ... with ids
prefixed "s<seed>-", concatenated until N), indexes it with BM25 and dense (MiniLM + FAISS flat),
fuses the two (hybrid), and prints one table:

- single-caller latency p50/p99 at top-5 for bm25, dense (query encoding included) and hybrid
  (as `load_index` serves it: the dense side behind a `BatchingRetriever`);
- dense throughput with 16 concurrent callers, one-at-a-time (each caller its own encoder+FAISS
  call) vs micro-batched (`BatchingRetriever`);
- cache hit p50: `MemoryCache.get_many` of one key and a `CachedRetriever` hit; the same for
  `RedisCache` with `--redis-url`;
- single-flight: 16 concurrent callers missing on one query through `CachedRetriever` in front of
  the dense index, and how many dense searches that cost;
- recall@5 of the gold passage on 1-hop questions (gold = the passage titled
  `question["entities"][0]` in the question's own world), over all sampled questions and over
  those whose gold title occurs once in the corpus (worlds of different seeds can reuse a name).

    .venv/bin/python bench/retrieval.py --passages 100000 [--redis-url redis://127.0.0.1:6379/0]
    .venv/bin/python bench/retrieval.py --passages 5000      # a quick smoke run

`--cache-dir DIR` keeps the encoded dense index between runs (encoding dominates the build).
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file shares its name with the package it measures: drop bench/ from sys.path (Python puts a
# script's directory first) and put the repository root there instead.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from bench.stats import percentile  # noqa: E402
from retrieval.batching import BatchingRetriever  # noqa: E402
from retrieval.bm25 import BM25Retriever  # noqa: E402
from retrieval.cache import CachedRetriever, MemoryCache, RedisCache  # noqa: E402
from retrieval.dense import DenseRetriever, passage_text  # noqa: E402
from retrieval.encoder import Encoder, default_encoder_path  # noqa: E402
from retrieval.hybrid import HybridRetriever  # noqa: E402
from retrieval.types import Cache, Passage, Retriever  # noqa: E402
from training.world import WorldConfig, generate_world, make_questions, render_corpus  # noqa: E402

K = 5
CHUNK = 4096  # passages encoded (and cached) at a time


def make_corpus(n_passages: int) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """(passages, 1-hop questions with a "gold" passage id), from worlds of seeds 0, 1, 2, ..."""
    passages: list[dict[str, str]] = []
    questions: list[dict[str, Any]] = []
    seed = 0
    while len(passages) < n_passages:
        world = generate_world(WorldConfig(seed=seed))
        rendered = render_corpus(world)[: n_passages - len(passages)]
        gold = {p["title"]: f"s{seed}-{p['id']}" for p in rendered}
        passages += [{**p, "id": f"s{seed}-{p['id']}"} for p in rendered]
        for q in make_questions(world):
            if q["type"] == "1hop" and q["entities"][0] in gold:
                questions.append({"question": q["question"], "gold": gold[q["entities"][0]]})
        seed += 1
    # Worlds draw names independently: some titles recur across seeds (work titles most), and a
    # question about such a name is ambiguous by construction. Mark the unambiguous ones.
    titles = Counter(p["title"] for p in passages)
    title_of = {p["id"]: p["title"] for p in passages}
    for q in questions:
        q["unique"] = titles[title_of[q["gold"]]] == 1
    return passages, questions


async def latencies_ms(call: Callable[[str], Awaitable[Any]], queries: list[str]) -> list[float]:
    for q in queries[:5]:  # warm-up: thread pool, caches, allocator
        await call(q)
    out = []
    for q in queries:
        start = time.perf_counter()
        await call(q)
        out.append((time.perf_counter() - start) * 1000)
    return out


async def throughput(retriever: Retriever, queries: list[str], callers: int) -> float:
    """Queries per second with `callers` concurrent callers, each searching one query at a time."""

    async def caller(mine: list[str]) -> None:
        for q in mine:
            await retriever.search([q], K)

    await retriever.search(queries[:1], K)
    start = time.perf_counter()
    await asyncio.gather(*(caller(queries[i::callers]) for i in range(callers)))
    return len(queries) / (time.perf_counter() - start)


async def recall_at_k(
    retriever: Retriever, questions: list[dict[str, Any]], batch: int
) -> tuple[float, float]:
    """(recall@K over all questions, over those whose gold title is unique in the corpus)."""
    hit: list[bool] = []
    for i in range(0, len(questions), batch):
        chunk = questions[i : i + batch]
        results = await retriever.search([q["question"] for q in chunk], K)
        hit += [q["gold"] in {p.id for p in r} for q, r in zip(chunk, results, strict=True)]
    unique = [h for h, q in zip(hit, questions, strict=True) if q["unique"]]
    return sum(hit) / len(hit), sum(unique) / max(1, len(unique))


async def cache_rows(name: str, cache: Cache, bm25: Retriever, queries: list[str]) -> list[str]:
    cached = CachedRetriever(bm25, cache, namespace=f"bench:{time.time_ns()}")
    await cached.search(queries, K)  # fill
    await cached.drain()
    keys = [cached.key(q, K) for q in queries]
    get = await latencies_ms(lambda key: cache.get_many([key]), keys)
    hit = await latencies_ms(lambda q: cached.search([q], K), queries)
    assert cached.misses == len(set(keys)), "a measured search missed the cache"
    return [
        f"| {name} get_many, 1 key (hit) | p50 {statistics.median(get):.3f} ms |",
        f"| CachedRetriever hit, {name} | p50 {statistics.median(hit):.3f} ms |",
    ]


class CountingRetriever:
    """Passes searches through to `inner`, counting the calls (what a cache in front saves)."""

    def __init__(self, inner: Retriever):
        self.inner = inner
        self.calls = 0

    async def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        self.calls += 1
        return await self.inner.search(queries, k)


async def single_flight_row(name: str, cache: Cache, dense: Retriever, query: str, n: int) -> str:
    """`n` concurrent callers miss on the same query at once: how many backend searches ran."""
    counting = CountingRetriever(dense)
    cached = CachedRetriever(counting, cache, namespace=f"bench-sf:{time.time_ns()}")
    results = await asyncio.gather(*(cached.search([query], K) for _ in range(n)))
    await cached.drain()
    same = all(r == results[0] for r in results)
    return (
        f"| {n} concurrent identical misses, {name} | {counting.calls} backend call(s); "
        f"{'identical' if same else 'DIFFERENT'} results |"
    )


def build_dense(
    passages: list[dict[str, str]], encoder: Encoder, cache_dir: Path | None
) -> tuple[DenseRetriever, float]:
    """The flat dense index and the seconds spent encoding. With `cache_dir`, embeddings are kept
    there in chunks, so an interrupted run resumes where it stopped."""
    kept = [Passage(p["id"], p["title"], p["text"]) for p in passages]
    texts = [passage_text(p) for p in kept]
    stamp = json.dumps([len(kept), kept[0].id, kept[-1].id, encoder.describe(), CHUNK])
    stamp_file = None if cache_dir is None else cache_dir / "stamp.json"
    if stamp_file is not None and not (stamp_file.is_file() and stamp_file.read_text() == stamp):
        for old in stamp_file.parent.glob("vectors-*.npy"):  # other corpus or encoder: restart
            old.unlink()
        stamp_file.write_text(stamp)
    chunks: list[np.ndarray] = []
    seconds = 0.0
    with tqdm(total=len(texts), desc="encode corpus", unit="passage") as bar:
        for i, start in enumerate(range(0, len(texts), CHUNK)):
            path = cache_dir / f"vectors-{i:04d}.npy" if cache_dir is not None else None
            if path is not None and path.is_file():
                chunks.append(np.load(path))
            else:
                t = time.perf_counter()
                chunks.append(encoder.encode_passages(texts[start : start + CHUNK]))
                seconds += time.perf_counter() - t
                if path is not None:
                    np.save(path, chunks[-1])
            bar.update(len(chunks[-1]))
    return DenseRetriever.from_vectors(kept, encoder, np.concatenate(chunks), "flat"), seconds


async def bench(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    passages, questions = make_corpus(args.passages)
    rng = random.Random(0)
    sample = rng.sample(questions, min(args.recall_questions, len(questions)))
    queries = [q["question"] for q in sample[: args.latency_queries]]
    print(f"corpus: {len(passages)} passages, {len(questions)} 1-hop questions "
          f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip

    start = time.perf_counter()
    bm25 = BM25Retriever.build(passages, show_progress=True)
    bm25_s = time.perf_counter() - start
    encoder = Encoder(args.encoder or default_encoder_path())
    dense, encode_s = build_dense(passages, encoder, args.cache_dir)
    batched = BatchingRetriever(dense)
    hybrid = HybridRetriever(bm25, batched)
    print(f"build: bm25 {bm25_s:.1f} s, dense: {encode_s:.0f} s encoding (cached chunks excluded)")

    rows = ["| measurement | result |", "|---|---|"]
    for name, r in (("bm25", bm25), ("dense (flat)", dense), ("hybrid (RRF)", hybrid)):
        ms = await latencies_ms(lambda q, r=r: r.search([q], K), queries)
        p50, p99 = statistics.median(ms), percentile(ms, 0.99)
        rows.append(f"| {name} top-{K}, 1 caller | p50 {p50:.2f} ms, p99 {p99:.2f} ms |")

    load = (queries * (1 + args.throughput_queries // len(queries)))[: args.throughput_queries]
    alone = await throughput(dense, load, args.callers)
    merged = await throughput(BatchingRetriever(dense), load, args.callers)
    rows.append(f"| dense, {args.callers} callers, one call each | {alone:.0f} queries/s |")
    rows.append(
        f"| dense, {args.callers} callers, micro-batched | {merged:.0f} queries/s "
        f"({merged / alone:.1f}x) |"
    )
    # the batcher's former policy, for comparison: a fixed 2 ms window, batches side by side
    timer = BatchingRetriever(dense, max_wait_ms=2, max_inflight=args.callers)
    timed = await throughput(timer, load, args.callers)
    rows.append(
        f"| dense, {args.callers} callers, micro-batched, 2 ms window, no in-flight limit | "
        f"{timed:.0f} queries/s ({timed / alone:.1f}x) |"
    )

    rows += await cache_rows("MemoryCache", MemoryCache(), bm25, queries)
    rows.append(await single_flight_row("MemoryCache", MemoryCache(), dense, queries[0], 16))
    if args.redis_url:
        redis_cache = RedisCache(args.redis_url)
        rows += await cache_rows("RedisCache", redis_cache, bm25, queries)
        rows.append(await single_flight_row("RedisCache", redis_cache, dense, queries[1], 16))
        await redis_cache.aclose()

    n_unique = sum(q["unique"] for q in sample)
    for name, r, batch in (("bm25", bm25, 256), ("dense", dense, 64), ("hybrid", hybrid, 64)):
        everyone, unique = await recall_at_k(r, sample, batch)
        rows.append(
            f"| recall@{K}, 1-hop, {name} | {everyone:.3f} of {len(sample)} questions; "
            f"{unique:.3f} of the {n_unique} whose gold title is unique |"
        )

    print(f"\n{len(passages)} passages, encoder {encoder.path.name} ({encoder.dim}-d), "
          f"total {time.perf_counter() - t0:.0f} s\n")  # fmt: skip
    print("\n".join(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passages", type=int, default=100_000)
    p.add_argument("--latency-queries", type=int, default=200)
    p.add_argument("--throughput-queries", type=int, default=512)
    p.add_argument("--recall-questions", type=int, default=1000)
    p.add_argument("--callers", type=int, default=16)
    p.add_argument("--redis-url", default=None)
    p.add_argument("--encoder", type=Path, default=None, help="encoder dir (default: MiniLM)")
    p.add_argument("--cache-dir", type=Path, default=None, help="reuse the encoded dense index")
    args = p.parse_args()
    if args.cache_dir is not None:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
