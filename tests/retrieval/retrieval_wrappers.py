"""Real `Retriever` wrappers for tests: they delegate to a real backend and record what they are
asked, or hold it at a gate so overlapping calls are deterministic (no sleeps)."""

from __future__ import annotations

import asyncio

from retrieval.types import Passage, Retriever


class CountingRetriever:
    """Delegates to a real retriever and records every batch it is asked for."""

    def __init__(self, inner: Retriever) -> None:
        self.inner = inner
        self.calls: list[tuple[list[str], int]] = []  # (queries, k) per backend call

    @property
    def queries(self) -> list[list[str]]:
        return [queries for queries, _ in self.calls]

    def record(self, queries: list[str], k: int) -> None:
        self.calls.append((list(queries), k))

    async def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        self.record(queries, k)
        return await self.inner.search(queries, k)


class GatedRetriever(CountingRetriever):
    """Holds every search at a gate until the test opens it."""

    def __init__(self, inner: Retriever) -> None:
        super().__init__(inner)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        self.record(queries, k)
        self.entered.set()
        await self.gate.wait()
        return await self.inner.search(queries, k)
