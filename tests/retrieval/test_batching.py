"""retrieval/batching.py: concurrent calls coalesced into one inner search, over the real dense
retriever (MiniLM + FAISS) and BM25. Overlaps are made deterministic by starting every caller
before the test yields to the event loop, or by holding the inner search at a gate."""

from __future__ import annotations

import asyncio
import threading

import pytest
from retrieval_corpus import CORPUS, PARAPHRASES
from retrieval_wrappers import CountingRetriever, GatedRetriever

from retrieval.batching import BatchingRetriever
from retrieval.bm25 import BM25Retriever
from retrieval.types import Passage, Retriever

pytest.importorskip("faiss", reason="the `dense` extra (faiss-cpu) is not installed")
from retrieval.dense import DenseRetriever  # noqa: E402

QUERIES = [q for q, _ in PARAPHRASES] + [p["title"] for p in CORPUS[10:16]]
assert len(QUERIES) == 16


class FlakyRetriever(CountingRetriever):
    """Fails its first `failures` searches, then delegates."""

    def __init__(self, inner: Retriever, failures: int = 1) -> None:
        super().__init__(inner)
        self.failures = failures

    async def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        self.record(queries, k)
        if len(self.calls) <= self.failures:
            raise RuntimeError("backend down")
        return await self.inner.search(queries, k)


class ThreadRecordingEncoder:
    """The real encoder, noting which thread each `encode_queries` call ran on."""

    def __init__(self, encoder) -> None:
        self._encoder = encoder
        self.threads: list[tuple[int, int]] = []  # (thread id, number of queries)

    def __getattr__(self, name: str):
        return getattr(self._encoder, name)

    def encode_queries(self, queries):
        self.threads.append((threading.get_ident(), len(queries)))
        return self._encoder.encode_queries(queries)


def ids(results: list[list[Passage]]) -> list[list[str]]:
    return [[p.id for p in hits] for hits in results]


def assert_same_results(got: list[list[Passage]], want: list[list[Passage]]) -> None:
    """Same passages in the same order; scores equal up to float noise from batch padding."""
    assert ids(got) == ids(want)
    for g, w in zip(got, want, strict=True):
        assert [p.score for p in g] == pytest.approx([p.score for p in w], abs=1e-5)


@pytest.fixture(scope="module")
def bm25() -> BM25Retriever:
    return BM25Retriever.build(CORPUS)


def test_16_concurrent_callers_make_one_inner_call(dense_flat):
    """Guards against: concurrent queries each paying their own encoder pass and FAISS search
    (the point of micro-batching), or batch results handed to the wrong caller."""
    counting = CountingRetriever(dense_flat)
    batcher = BatchingRetriever(counting, max_batch=64, max_wait_ms=2)

    async def main() -> list[list[list[Passage]]]:
        # gather starts all 16 tasks before the loop runs any: they join one window.
        return await asyncio.gather(*(batcher.search([q], 5) for q in QUERIES))

    batched = asyncio.run(main())
    assert counting.calls == [(QUERIES, 5)]
    assert batcher.batches == 1 and batcher.calls == 16
    unbatched = [asyncio.run(dense_flat.search([q], 5)) for q in QUERIES]
    for got, want in zip(batched, unbatched, strict=True):
        assert_same_results(got, want)


def test_full_batch_dispatches_without_waiting(bm25):
    """Guards against: a full batch waiting out max_wait_ms (latency for nothing), and one call
    with more queries than max_batch being split or stuck."""
    counting = CountingRetriever(bm25)
    batcher = BatchingRetriever(counting, max_batch=4, max_wait_ms=3_600_000)  # timer never fires

    async def main() -> None:
        four = await asyncio.gather(*(batcher.search([q], 3) for q in QUERIES[:4]))
        big = await batcher.search(QUERIES[:10], 3)
        assert [r for [r] in four] == big[:4]

    asyncio.run(main())
    assert [len(queries) for queries, _ in counting.calls] == [4, 10]


def test_overflowing_window_starts_a_new_batch(bm25):
    """Guards against: a window growing past max_batch because calls carry several queries."""
    counting = CountingRetriever(bm25)
    batcher = BatchingRetriever(counting, max_batch=4, max_wait_ms=1)

    async def main() -> list[list[list[Passage]]]:
        return await asyncio.gather(*(batcher.search(QUERIES[i : i + 3], 2) for i in (0, 3, 6)))

    results = asyncio.run(main())
    assert [len(queries) for queries, _ in counting.calls] == [3, 3, 3]
    assert results == [asyncio.run(bm25.search(QUERIES[i : i + 3], 2)) for i in (0, 3, 6)]


def test_different_k_are_batched_separately(bm25):
    """Guards against: searching everyone with one k and truncating, which changes results for
    ties at the cut, or returning k=5 results to a caller that asked for 2."""
    counting = CountingRetriever(bm25)
    batcher = BatchingRetriever(counting, max_batch=64, max_wait_ms=1)

    async def main() -> list[list[list[Passage]]]:
        return await asyncio.gather(
            *(batcher.search([q], 2 + i % 2) for i, q in enumerate(QUERIES))
        )

    results = asyncio.run(main())
    assert sorted(k for _, k in counting.calls) == [2, 3] and batcher.batches == 2
    for i, (q, got) in enumerate(zip(QUERIES, results, strict=True)):
        assert got == asyncio.run(bm25.search([q], 2 + i % 2))


def test_dense_batch_is_one_encoder_call_in_one_worker_thread(minilm):
    """Guards against: the encoder/FAISS work running on the event loop (blocking every other
    request), or a batch being encoded query by query."""
    recording = ThreadRecordingEncoder(minilm)
    dense = DenseRetriever.build(CORPUS, recording)
    batcher = BatchingRetriever(dense, max_batch=16, max_wait_ms=3_600_000)

    async def main() -> int:
        await asyncio.gather(*(batcher.search([q], 3) for q in QUERIES))
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert len(recording.threads) == 1
    [(worker, n_queries)] = recording.threads
    assert n_queries == 16 and worker != loop_thread


def test_cancelled_caller_does_not_cancel_the_batch(bm25):
    """Guards against: one client disconnect cancelling the shared search, so every other request
    of the batch fails with CancelledError."""
    gated = GatedRetriever(bm25)
    batcher = BatchingRetriever(gated, max_batch=64, max_wait_ms=1)

    async def main() -> None:
        tasks = [asyncio.create_task(batcher.search([q], 3)) for q in QUERIES[:4]]
        await gated.entered.wait()  # the batch is inside the backend
        tasks[0].cancel()
        gated.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        for q, got in zip(QUERIES[1:4], results[1:], strict=True):
            assert got == await bm25.search([q], 3)

    asyncio.run(main())
    assert len(gated.calls) == 1


def test_caller_cancelled_before_dispatch_is_left_out(bm25):
    """Guards against: searching for callers that are already gone."""
    counting = CountingRetriever(bm25)
    batcher = BatchingRetriever(counting, max_batch=3, max_wait_ms=3_600_000)

    async def main() -> None:
        gone = asyncio.create_task(batcher.search(["Kessel Bridge"], 2))
        await asyncio.sleep(0)  # one loop step: `gone` has joined the window
        gone.cancel()
        await asyncio.gather(batcher.search(["bread"], 2), batcher.search(["violin"], 2))
        assert gone.cancelled()

    asyncio.run(main())
    assert counting.calls == [(["bread", "violin"], 2)]


def test_inner_error_reaches_every_caller_and_the_next_batch_works(bm25):
    """Guards against: an exception reaching only the first caller while the others hang, or a
    failed batch leaving the batcher stuck."""
    flaky = FlakyRetriever(bm25, failures=1)
    batcher = BatchingRetriever(flaky, max_batch=64, max_wait_ms=1)

    async def main() -> None:
        results = await asyncio.gather(
            *(batcher.search([q], 3) for q in QUERIES), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) and "backend down" in str(r) for r in results)
        assert len(flaky.calls) == 1
        [hits] = await batcher.search(["Kessel Bridge"], 1)
        assert hits[0].title == "Kessel Bridge"

    asyncio.run(main())


def test_single_caller_is_served_by_the_timer(bm25):
    """Guards against: a lone call (no batch to fill) waiting forever for company."""
    for wait_ms in (0, 2):
        batcher = BatchingRetriever(bm25, max_batch=64, max_wait_ms=wait_ms)
        [hits] = asyncio.run(batcher.search(["Saltmere herring"], 1))
        assert hits[0].title == "Saltmere"
    assert asyncio.run(BatchingRetriever(bm25).search([], 3)) == []
    with pytest.raises(ValueError):
        BatchingRetriever(bm25, max_batch=0)


def test_calls_arriving_while_a_batch_runs_become_the_next_batch(bm25):
    """Guards against: a due window starting a second batch beside the running one (two batches
    fighting for the same cores), a waiting window never sent when the running batch finishes,
    and a lone call waiting for a timer when nothing runs."""
    gated = GatedRetriever(bm25)
    batcher = BatchingRetriever(gated, max_batch=64)  # max_wait_ms=0, max_inflight=1

    async def main() -> None:
        first = asyncio.create_task(batcher.search(["Kessel Bridge"], 2))
        await gated.entered.wait()  # dispatched alone, without waiting: nothing else ran
        later = [asyncio.create_task(batcher.search([q], 2)) for q in ("bread", "violin")]
        for _ in range(5):
            await asyncio.sleep(0)  # their window is due now, but a batch runs
        assert len(gated.calls) == 1
        gated.gate.set()
        got = await asyncio.gather(first, *later)
        want = [await bm25.search([q], 2) for q in ("Kessel Bridge", "bread", "violin")]
        assert got == want

    asyncio.run(main())
    assert [c[0] for c in gated.calls] == [["Kessel Bridge"], ["bread", "violin"]]
    with pytest.raises(ValueError, match="max_inflight"):
        BatchingRetriever(bm25, max_inflight=0)
