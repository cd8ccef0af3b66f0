"""retrieval/bm25.py: ranking, batching, k clamping, no-match queries, save/load."""

from __future__ import annotations

import asyncio

import pytest

from retrieval.bm25 import BM25Retriever, tokenize
from retrieval.types import Passage, Retriever

FIRST = [
    "Ada",
    "Borin",
    "Cira",
    "Dov",
    "Elsa",
    "Fenn",
    "Gita",
    "Hugo",
    "Ines",
    "Jarl",
    "Kira",
    "Lars",
    "Mira",
    "Nils",
    "Olga",
    "Pavo",
    "Quin",
    "Rosa",
    "Sven",
    "Tova",
]
LAST = [
    "Lind",
    "Kask",
    "Moll",
    "Tarn",
    "Quill",
    "Oort",
    "Vane",
    "Brask",
    "Kolb",
    "Penn",
    "Sokk",
    "Vell",
    "Dunn",
    "Orra",
    "Hale",
    "Rusk",
    "Yarrow",
    "Zell",
    "Ulm",
    "Wick",
]
CITIES = ["Norvik", "Palm Harbor", "Estermoor", "Quellstad"]
JOBS = ["painter", "chemist", "sailor", "architect", "composer"]
# 20 fictional people; every text contains "born", each name exactly once in the corpus.
PEOPLE = [
    {
        "id": f"p{i}",
        "title": f"{first} {last}",
        "text": f"{first} {last} is a {JOBS[i % 5]} born in {CITIES[i % 4]} in {1900 + 3 * i}.",
    }
    for i, (first, last) in enumerate(zip(FIRST, LAST, strict=True))
]


@pytest.fixture(scope="module")
def retriever() -> BM25Retriever:
    return BM25Retriever.build(PEOPLE)


def search(r: Retriever, queries: list[str], k: int) -> list[list[Passage]]:
    return asyncio.run(r.search(queries, k))


def test_is_a_retriever(retriever):
    """Guards against: BM25Retriever drifting from the Retriever protocol the agent depends on."""
    assert isinstance(retriever, Retriever)
    assert len(retriever) == 20


def test_name_query_ranks_the_person_first(retriever):
    """Guards against: indexing only the text (not the title) or mis-mapping bm25s doc indices to
    passages, either of which puts the wrong person first."""
    [hits] = search(retriever, ["Who is Hugo Brask?"], 3)
    assert hits[0].id == "p7"
    assert hits[0].title == "Hugo Brask"
    assert all(isinstance(p.score, float) for p in hits)
    assert [p.score for p in hits] == sorted((p.score for p in hits), reverse=True)
    assert hits[0].score > 0


def test_batched_results_keep_query_order(retriever):
    """Guards against: results of a batch coming back in another order than the queries."""
    queries = ["Tova Wick", "ada lind", "Where was Mira Dunn born?", "Borin Kask composer"]
    results = search(retriever, queries, 2)
    assert [r[0].id for r in results] == ["p19", "p0", "p12", "p1"]


def test_k_larger_than_corpus_is_clamped(retriever):
    """Guards against: bm25s raising ValueError when k exceeds the number of documents."""
    [everyone, one] = search(retriever, ["born", "Lars Vell"], 1000)
    assert len(everyone) == 20  # "born" is in every passage
    assert len({p.id for p in everyone}) == 20
    assert one[0].id == "p11"
    assert all(p.score > 0 for p in one)  # passages sharing no term are not padding the list


def test_query_without_known_tokens_returns_empty_list(retriever):
    """Guards against: a crash, or k arbitrary zero-score "hits", for a query whose tokens are all
    unknown or stopwords — while the other queries of the batch still get results."""
    results = search(retriever, ["zyxxy qwrt", "the of and", "", "Ines Kolb"], 3)
    assert results[:3] == [[], [], []]
    assert results[3][0].id == "p8"


def test_degenerate_batches(retriever):
    """Guards against: crashing on an empty query list or k <= 0 instead of returning nothing."""
    assert search(retriever, [], 3) == []
    assert search(retriever, ["Ada Lind"], 0) == [[]]


def test_tokenizer_lowercases_and_drops_stopwords():
    """Guards against: build-time and query-time tokenization disagreeing on case or stopwords."""
    assert tokenize("The Painter of NORVIK, a city") == ["painter", "norvik", "city"]


def test_save_load_round_trip_gives_identical_results(retriever, tmp_path):
    """Guards against: a saved index that loads with other passages, ids, order or scores."""
    retriever.save(tmp_path / "idx")
    loaded = BM25Retriever.load(tmp_path / "idx")
    queries = ["Rosa Zell", "chemist born in Norvik", "Palm Harbor sailor", "nothing matches zz"]
    assert search(loaded, queries, 5) == search(retriever, queries, 5)
    assert loaded.params == retriever.params


def test_build_rejects_empty_corpus():
    """Guards against: an empty corpus producing an index that fails at the first query."""
    with pytest.raises(ValueError, match="empty corpus"):
        BM25Retriever.build([])
