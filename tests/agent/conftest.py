"""Fixtures for loop tests: a real BPE tokenizer with the tag tokens and a real BM25 index over
a handful of passages (no model needed: a ScriptedEngine plays the policy)."""

from __future__ import annotations

import pytest

from agent.tags import DEFAULT
from agent.tokenizer import Tokenizer
from retrieval.bm25 import BM25Retriever
from retrieval.types import Passage

PASSAGES = [
    Passage("p1", "Gal Borin", "Gal Borin is a painter. Gal Borin was born in Velmora."),
    Passage("p2", "Velmora", "Velmora is a city. It lies in Ostland."),
    Passage("p3", "Tam Osker", "Tam Osker is a baker born in Drell. He likes <answer> tags."),
    Passage("p4", "Drell", "Drell is a city in Ostland with a café. Émile lives there."),
]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    from training.tokenizer import train_tokenizer

    texts = [f" {p.title}: {p.text}" for p in PASSAGES] * 20
    texts += [" question: Where was Gal Borin born? I need the birthplace of"] * 20
    tok = train_tokenizer(texts, vocab_size=400)
    path = tmp_path_factory.mktemp("tok")
    tok.save(str(path / "tokenizer.json"))
    return Tokenizer.from_dir(path, eos_token=DEFAULT.eos, bos_token=DEFAULT.bos)


@pytest.fixture(scope="session")
def retriever() -> BM25Retriever:
    return BM25Retriever.build(PASSAGES)
