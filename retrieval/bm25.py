"""`BM25Retriever`: lexical top-k search with bm25s (sparse CSC matrix, numpy, no model).

Each passage is indexed as `title + " " + text`. Tokenization is ours, not bm25s's, and the same at
build and query time: lowercase, the regex `\\b\\w\\w+\\b` (scikit-learn's, bm25s's default), minus
bm25s's English stopwords. We assign token ids in first-seen order and hand bm25s `(ids, vocab)`:
bm25s's own string path numbers its vocabulary by iterating a `set`, so the same corpus would give
different files in every process (string hashing is randomized).

Things bm25s does that we steer around (see `_search_blocking`):
- `retrieve` raises when k exceeds the corpus size, so k is clamped;
- a query with no known token scores every document 0 and still returns k arbitrary "hits", and
  its empty-token fallback can raise; such queries never reach bm25s and get `[]`;
- progress bars are on by default; we pass `show_progress=False` everywhere.

Only "lucene" scoring is offered: its idf is always positive, so score > 0 means "shares a term
with the query" and zero-score padding can be dropped.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN
from tqdm.auto import tqdm

from retrieval.corpus import read_corpus
from retrieval.types import Passage

# Bump when `tokenize` changes: the name is part of an index's params, hence of its fingerprint.
TOKENIZER = "lower-w2-en-stopwords-v1"
_TOKEN_RE = re.compile(r"(?u)\b\w\w+\b")
_STOPWORDS = frozenset(STOPWORDS_EN)

PASSAGES_FILE = "passages.jsonl"


def tokenize(text: str) -> list[str]:
    """The one tokenizer for documents and queries."""
    return [t for t in _TOKEN_RE.findall(text.lower()) if t not in _STOPWORDS]


class BM25Retriever:
    """In-memory BM25 index plus the passages it returns; `build` one, or `load` a saved one."""

    kind = "bm25"
    # Everything `save` writes (bm25s's default file names) and `load` needs.
    FILES = (
        PASSAGES_FILE,
        "params.index.json",
        "vocab.index.json",
        "data.csc.index.npy",
        "indices.csc.index.npy",
        "indptr.csc.index.npy",
    )

    def __init__(self, passages: list[Passage], model: bm25s.BM25) -> None:
        n_docs = model.scores["num_docs"]
        if n_docs != len(passages):
            raise ValueError(f"{len(passages)} passages but a BM25 matrix of {n_docs} documents")
        self._passages = passages
        self._model = model
        self._vocab: dict[str, int] = model.vocab_dict

    @classmethod
    def build(
        cls,
        passages: Iterable[Mapping[str, Any] | Passage],
        *,
        k1: float = 1.5,
        b: float = 0.75,
        show_progress: bool = False,
    ) -> BM25Retriever:
        """Index passages (dicts with id/title/text, or `Passage`s); consumes an iterator once."""
        kept: list[Passage] = []
        vocab: dict[str, int] = {}
        doc_ids: list[list[int]] = []  # (n_docs, doc_len) token ids
        for p in tqdm(passages, desc="bm25 tokenize", unit="passage", disable=not show_progress):
            if isinstance(p, Passage):
                passage = Passage(p.id, p.title, p.text)
            else:
                passage = Passage(str(p["id"]), p.get("title", ""), p["text"])
            kept.append(passage)
            tokens = tokenize(f"{passage.title} {passage.text}")
            doc_ids.append([vocab.setdefault(t, len(vocab)) for t in tokens])
        if not kept:
            raise ValueError("cannot build a BM25 index from an empty corpus")
        model = bm25s.BM25(k1=k1, b=b, method="lucene")
        model.index((doc_ids, vocab), create_empty_token=False, show_progress=show_progress)
        return cls(kept, model)

    @property
    def params(self) -> dict[str, Any]:
        """What decides the scores; goes into the index manifest and its fingerprint."""
        model = self._model
        return {"k1": model.k1, "b": model.b, "method": "lucene", "tokenizer": TOKENIZER}

    def __len__(self) -> int:
        return len(self._passages)

    async def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Top-k per query, best first; fewer than k when fewer passages share a term with it."""
        if not queries:
            return []
        return await asyncio.to_thread(self._search_blocking, queries, k)

    def _search_blocking(self, queries: list[str], k: int) -> list[list[Passage]]:
        k = min(k, len(self._passages))
        results: list[list[Passage]] = [[] for _ in queries]
        query_ids = [[self._vocab[t] for t in tokenize(q) if t in self._vocab] for q in queries]
        live = [i for i, ids in enumerate(query_ids) if ids]
        if k <= 0 or not live:
            return results
        found = self._model.retrieve(  # one batched call; documents/scores are (len(live), k)
            [query_ids[i] for i in live],
            k=k,
            show_progress=False,
            backend_selection="numpy",
        )
        docs_per_query, scores_per_query = found.documents.tolist(), found.scores.tolist()
        for i, docs, scores in zip(live, docs_per_query, scores_per_query, strict=True):
            # Ties come back in argpartition order; sort by (score desc, corpus order): stable.
            ranked = sorted(zip(scores, docs, strict=True), key=lambda sd: (-sd[0], sd[1]))
            results[i] = [self._scored(doc, score) for score, doc in ranked if score > 0]
        return results

    def _scored(self, doc: int, score: float) -> Passage:
        p = self._passages[doc]
        return Passage(p.id, p.title, p.text, float(score))

    def save(self, directory: str | PathLike[str]) -> None:
        """Write bm25s's files plus `passages.jsonl` (index order) into `directory`."""
        directory = Path(directory)
        self._model.save(directory, show_progress=False)
        with (directory / PASSAGES_FILE).open("w", encoding="utf-8") as f:
            for p in self._passages:
                row = {"id": p.id, "title": p.title, "text": p.text}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | PathLike[str]) -> BM25Retriever:
        """Inverse of `save`. Raises OSError/ValueError on missing or inconsistent files."""
        directory = Path(directory)
        model = bm25s.BM25.load(directory, load_corpus=False, show_progress=False)
        _check_matrix(model.scores, len(model.vocab_dict))  # files can be damaged; a build's not
        rows = read_corpus(directory / PASSAGES_FILE)
        return cls([Passage(r["id"], r["title"], r["text"]) for r in rows], model)


def _check_matrix(scores: Mapping[str, Any], n_terms: int) -> None:
    """The term-by-document matrix (CSC: a column per term, row indices are documents) is what
    a search reads: a damaged array would crash the first search (an index out of bounds) or
    silently score the wrong passages. One linear pass over it, at load."""
    data, indices, indptr = scores["data"], scores["indices"], scores["indptr"]
    n_docs = scores["num_docs"]
    if len(indptr) != n_terms + 1:
        raise ValueError(f"the BM25 matrix has {len(indptr) - 1} terms, its vocabulary {n_terms}")
    if len(data) != len(indices) or indptr[0] != 0 or indptr[-1] != len(indices):
        raise ValueError("the BM25 matrix's arrays disagree in length")
    if len(indptr) > 1 and bool(np.any(np.diff(indptr) < 0)):
        raise ValueError("the BM25 matrix's column pointers are not in order")
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= n_docs):
        raise ValueError(f"the BM25 matrix names documents outside its {n_docs}")
    if not bool(np.all(np.isfinite(data))):
        raise ValueError("the BM25 matrix holds scores that are not finite numbers")
