"""Fixtures for the dense retrieval tests: the real MiniLM encoder (loaded once per session), a
small topic-diverse corpus with paraphrased queries, and tiny real encoders of other shapes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from retrieval_corpus import CORPUS

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 encoder, loaded once for the session."""
    pytest.importorskip("faiss", reason="the `dense` extra (faiss-cpu) is not installed")
    pytest.importorskip("torch", reason="the `torch` extra is not installed")
    from retrieval.encoder import Encoder, default_encoder_path

    return Encoder(default_encoder_path())


@pytest.fixture(scope="session")
def dense_flat(minilm):
    """A flat (exact) dense index over `CORPUS`."""
    from retrieval.dense import DenseRetriever

    return DenseRetriever.build(CORPUS, minilm)


@pytest.fixture(scope="session")
def mixed_corpus() -> list[dict[str, str]]:
    """`CORPUS` plus a small generated world (69 encyclopedia passages about invented entities)."""
    from training.world import WorldConfig, generate_world, render_corpus

    config = WorldConfig(
        seed=3, n_people=40, n_cities=10, n_countries=3, n_organizations=8, n_works=8,
        n_famous_people=2, n_famous_cities=1,
    )  # fmt: skip
    return CORPUS + render_corpus(generate_world(config))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in CORPUS), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def make_tiny_encoder(tmp_path_factory, minilm):
    """Writes a real, randomly initialised one-layer BERT encoder directory of a given width, with
    MiniLM's tokenizer: an encoder of another shape (or another model) to load an index with."""
    import torch
    from transformers import BertConfig, BertModel

    def make(hidden_size: int) -> Path:
        out = tmp_path_factory.mktemp(f"tiny-bert-{hidden_size}")
        torch.manual_seed(0)
        config = BertConfig(
            hidden_size=hidden_size,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=2 * hidden_size,
        )
        BertModel(config).save_pretrained(out)
        for name in TOKENIZER_FILES:
            shutil.copy(minilm.path / name, out / name)
        return out

    return make
