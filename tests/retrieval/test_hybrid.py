"""retrieval/hybrid.py (reciprocal-rank fusion) and the hybrid kind of retrieval/index.py."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import pytest
from retrieval_corpus import CORPUS, PARAPHRASES, TITLE_TO_ID

from retrieval.batching import BatchingRetriever
from retrieval.bm25 import BM25Retriever
from retrieval.hybrid import HybridRetriever, fuse
from retrieval.index import IndexLoadError, build_index, fingerprint, load_index
from retrieval.types import Passage, Retriever


class FixedRetriever:
    """A real in-memory retriever with one fixed ranking (passage ids, best first) per query."""

    def __init__(self, rankings: dict[str, list[str]]) -> None:
        self.rankings = rankings
        self.asked: list[int] = []  # the k of every call

    async def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        self.asked.append(k)
        return [
            [Passage(pid, pid.upper(), f"text of {pid}", 1.0 / r) for r, pid in enumerate(ids, 1)][
                :k
            ]
            for ids in (self.rankings.get(q, []) for q in queries)
        ]


class BlockedRetriever:
    """Never answers; records whether its search was cancelled."""

    def __init__(self) -> None:
        self.cancelled = False

    async def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")


class BrokenRetriever:
    async def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        await asyncio.sleep(0)
        raise RuntimeError("index offline")


def search(r: Retriever, queries: list[str], k: int) -> list[list[Passage]]:
    return asyncio.run(r.search(queries, k))


def test_rrf_order_and_scores_hand_checked():
    """Guards against: fusing raw scores instead of ranks, ranks counted from 0, or a passage
    found by both lists not getting both votes."""
    a = FixedRetriever({"q": ["p1", "p2", "p3", "p4"]})
    b = FixedRetriever({"q": ["p3", "p1", "p5"]})
    [hits] = search(HybridRetriever(a, b, k_rrf=60), ["q"], 5)
    # p1: 1/61 + 1/62   p3: 1/63 + 1/61   p2: 1/62   p5: 1/63   p4: 1/64
    assert [p.id for p in hits] == ["p1", "p3", "p2", "p5", "p4"]
    expected = [1 / 61 + 1 / 62, 1 / 63 + 1 / 61, 1 / 62, 1 / 63, 1 / 64]
    assert [p.score for p in hits] == pytest.approx(expected, rel=1e-12)
    assert hits[0] == Passage("p1", "P1", "text of p1", pytest.approx(expected[0]))


def test_rrf_ties_break_by_best_rank_then_first_retriever():
    """Guards against: a tie order that depends on dict or set iteration, so the same query gives
    differently ordered documents (and a different cache entry) from run to run."""
    ranked = fuse(
        [
            [Passage("x", "", ""), Passage("y", "", ""), Passage("z", "", "")],
            [Passage("z", "", ""), Passage("w", "", ""), Passage("x", "", "")],
        ],
        k_rrf=60,
    )
    # x and z both 1/61 + 1/63 (x best rank 1 in `a`, z best rank 1 in `b`); y and w both 1/62.
    assert [p.id for p in ranked] == ["x", "z", "y", "w"]


def test_duplicates_are_merged_and_vote_once():
    """Guards against: the same passage appearing twice in the fused list, or a retriever that
    repeats a passage voting for it twice."""
    ranked = fuse([[Passage("a", "", ""), Passage("a", "", "")], [Passage("a", "", "")]], 60)
    assert [(p.id, p.score) for p in ranked] == [("a", pytest.approx(2 / 61))]


def test_retrievers_are_asked_deeper_than_k():
    """Guards against: fusing two top-k lists, where a passage ranked k+1 by both never gets the
    votes that would lift it into the top k."""
    a, b = FixedRetriever({}), FixedRetriever({})
    search(HybridRetriever(a, b), ["q"], 5)
    search(HybridRetriever(a, b), ["q"], 30)
    search(HybridRetriever(a, b, depth=7), ["q"], 5)
    assert a.asked == b.asked == [20, 30, 7]
    assert search(HybridRetriever(a, b), [], 5) == []
    assert search(HybridRetriever(a, b), ["q", "r"], 0) == [[], []]


def test_one_failing_retriever_fails_the_call_and_stops_the_other():
    """Guards against: a failed backend leaving its sibling search running forever in the
    background (gather does not cancel siblings), or its error being swallowed."""
    blocked = BlockedRetriever()
    with pytest.raises(RuntimeError, match="index offline"):
        search(HybridRetriever(blocked, BrokenRetriever()), ["q"], 3)
    assert blocked.cancelled


def test_bm25_plus_dense_on_real_corpus(dense_flat):
    """Guards against: hybrid results with duplicate passages, scores out of order, or losing what
    one side alone finds (exact names via BM25, paraphrases via dense)."""
    hybrid = HybridRetriever(BM25Retriever.build(CORPUS), dense_flat)
    pairs = PARAPHRASES + [
        ("Copper Vale Mine", "Copper Vale Mine"),
        ("tobacco levy", "Ninefold Tax Act"),
    ]
    queries = [q for q, _ in pairs]
    expected = [TITLE_TO_ID[t] for _, t in pairs]
    results = search(hybrid, queries, 3)
    for hits, want in zip(results, expected, strict=True):
        assert len({p.id for p in hits}) == len(hits) == 3
        assert [p.score for p in hits] == sorted((p.score for p in hits), reverse=True)
        assert want in [p.id for p in hits]


def test_build_and_load_hybrid_index(corpus_file, tmp_path, dense_flat):
    """Guards against: a hybrid index whose manifest does not cover both halves (a cache would
    keep serving after one half changed), or a loaded hybrid without batching on its dense side."""
    out = build_index(
        corpus_file, tmp_path / "idx", "hybrid", show_progress=False, k_rrf=30, k1=1.2
    )
    assert sorted(os.listdir(out)) == ["bm25", "dense", "index.json"]
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["kind"] == "hybrid" and manifest["n_passages"] == len(CORPUS)
    params = manifest["params"]
    assert params["fusion"] == {"k_rrf": 30, "depth": None}
    assert params["bm25"]["k1"] == 1.2 and params["dense"]["faiss"] == {"kind": "flat"}
    assert params["dense"]["encoder"]["dim"] == 384
    from retrieval.dense import DenseRetriever

    dense_files = [f"dense/{n}" for n in DenseRetriever.FILES]
    bm25_files = [f"bm25/{n}" for n in BM25Retriever.FILES]
    assert sorted(manifest["files"]) == sorted(bm25_files + dense_files)
    retriever = load_index(out)
    assert isinstance(retriever, HybridRetriever) and retriever.k_rrf == 30
    assert isinstance(retriever.a, BM25Retriever)
    assert isinstance(retriever.b, BatchingRetriever)
    [hits] = search(retriever, ["mountain that spews lava"], 3)
    assert hits[0].title == "Mount Ossery"
    other = build_index(corpus_file, tmp_path / "other", "hybrid", show_progress=False)
    assert fingerprint(other) != fingerprint(out)


def test_hybrid_index_with_missing_part(corpus_file, tmp_path, minilm):
    """Guards against: a hybrid index missing one half loading as a one-sided retriever, or
    failing with a traceback instead of one line naming the file."""
    out = build_index(corpus_file, tmp_path / "idx", "hybrid", show_progress=False)
    (out / "bm25" / "vocab.index.json").unlink()
    with pytest.raises(IndexLoadError, match="missing file.*bm25/vocab.index.json"):
        load_index(out)
    shutil.rmtree(out / "dense")
    with pytest.raises(IndexLoadError, match="missing file.*dense/faiss.index"):
        load_index(out)


def test_load_one_half_of_a_hybrid_index(corpus_file, tmp_path, minilm):
    """Guards against `serve --retriever bm25|dense` on a hybrid index loading the wrong backend,
    or a request for a backend the index does not hold loading anyway instead of failing."""
    out = build_index(corpus_file, tmp_path / "idx", "hybrid", show_progress=False)
    bm25 = load_index(out, part="bm25")
    dense = load_index(out, part="dense")
    assert isinstance(bm25, BM25Retriever) and isinstance(dense, BatchingRetriever)
    assert isinstance(load_index(out, part="hybrid"), HybridRetriever)
    [hits] = search(dense, ["mountain that spews lava"], 1)
    assert hits[0].title == "Mount Ossery"  # a paraphrase only the encoder matches
    only_bm25 = build_index(corpus_file, tmp_path / "bm25")
    with pytest.raises(IndexLoadError, match="it is a bm25 index, not dense.*--kind dense"):
        load_index(only_bm25, part="dense")
    with pytest.raises(IndexLoadError, match="unknown retriever 'sparse'"):
        load_index(only_bm25, part="sparse")
