"""`HybridRetriever`: reciprocal-rank fusion (RRF) of two retrievers, typically BM25 + dense.

Both retrievers are asked, concurrently, for `depth` results per query (default max(k, 20): a
passage ranked 8th by both should beat one ranked 1st by one only, so each list must reach past k).
A passage's fused score is the sum over the lists it appears in of 1 / (k_rrf + rank), rank counted
from 1 (Cormack et al., 2009; k_rrf = 60 as there). Passages are identified by id; the fused list
is sorted by score, ties broken by the better single rank, then by `a` before `b`. Only ranks
matter: BM25 scores and cosines need no calibration against each other.
"""

from __future__ import annotations

import asyncio

from retrieval.types import Passage, Retriever


class HybridRetriever:
    """A `Retriever` over `a` and `b`; `Passage.score` is the fused RRF score."""

    def __init__(self, a: Retriever, b: Retriever, k_rrf: float = 60, depth: int | None = None):
        if k_rrf < 0 or (depth is not None and depth < 1):
            raise ValueError(f"need k_rrf >= 0 and depth >= 1: {k_rrf}, {depth}")
        self.a = a
        self.b = b
        self.k_rrf = k_rrf
        self.depth = depth

    @property
    def params(self) -> dict[str, float | int | None]:
        return {"k_rrf": self.k_rrf, "depth": self.depth}

    async def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        if not queries:
            return []
        if k <= 0:
            return [[] for _ in queries]
        depth = self.depth if self.depth is not None else max(k, 20)
        tasks = [asyncio.ensure_future(r.search(queries, depth)) for r in (self.a, self.b)]
        try:
            ranked_a, ranked_b = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one failed (or we were cancelled): stop the other too
                task.cancel()
            raise
        return [fuse([a, b], self.k_rrf)[:k] for a, b in zip(ranked_a, ranked_b, strict=True)]


def fuse(rankings: list[list[Passage]], k_rrf: float = 60) -> list[Passage]:
    """RRF of ranked lists (best first) into one list, best first, deduplicated by passage id."""
    score: dict[str, float] = {}
    best: dict[str, tuple[int, int]] = {}  # id -> (best rank, index of the list it came from)
    first: dict[str, Passage] = {}
    for source, ranking in enumerate(rankings):
        seen: set[str] = set()
        for rank, p in enumerate(ranking, start=1):
            if p.id in seen:  # a list repeating a passage does not vote twice
                continue
            seen.add(p.id)
            score[p.id] = score.get(p.id, 0.0) + 1.0 / (k_rrf + rank)
            best[p.id] = min(best.get(p.id, (rank, source)), (rank, source))
            first.setdefault(p.id, p)
    order = sorted(score, key=lambda pid: (-score[pid], best[pid]))
    return [Passage(pid, first[pid].title, first[pid].text, score[pid]) for pid in order]
