"""Retrieval: corpus files, index build/load, BM25 search, result caches.

The rest of the project talks to retrieval through `Passage`, `Retriever` and `Cache`
(`retrieval/types.py`); the names below are the implementations and the index tooling.
Importing this package pulls numpy, bm25s and redis, never torch.
"""

from retrieval.bm25 import BM25Retriever
from retrieval.cache import CachedRetriever, MemoryCache, RedisCache
from retrieval.corpus import read_corpus
from retrieval.index import IndexLoadError, build_index, load_index
from retrieval.types import Cache, Passage, Retriever

__all__ = [
    "BM25Retriever",
    "Cache",
    "CachedRetriever",
    "IndexLoadError",
    "MemoryCache",
    "Passage",
    "RedisCache",
    "Retriever",
    "build_index",
    "load_index",
    "read_corpus",
]
