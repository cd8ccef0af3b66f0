"""Retrieval: corpus files, index build/load, BM25 / dense / hybrid search, batching, caches.

The rest of the project talks to retrieval through `Passage`, `Retriever` and `Cache`
(`retrieval/types.py`); the names below are the implementations and the index tooling.
Importing this package pulls numpy, bm25s and redis, never torch or faiss: `DenseRetriever` and
`Encoder` (the `dense` extra) are imported on first use of those names.
"""

from typing import Any

from retrieval.batching import BatchingRetriever
from retrieval.bm25 import BM25Retriever
from retrieval.cache import CachedRetriever, MemoryCache, RedisCache
from retrieval.corpus import read_corpus
from retrieval.hybrid import HybridRetriever
from retrieval.index import IndexLoadError, build_index, load_index
from retrieval.types import Cache, Passage, Retriever

_LAZY = {"DenseRetriever": "retrieval.dense", "Encoder": "retrieval.encoder"}

__all__ = [
    "BM25Retriever",
    "BatchingRetriever",
    "Cache",
    "CachedRetriever",
    "DenseRetriever",
    "Encoder",
    "HybridRetriever",
    "IndexLoadError",
    "MemoryCache",
    "Passage",
    "RedisCache",
    "Retriever",
    "build_index",
    "load_index",
    "read_corpus",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
