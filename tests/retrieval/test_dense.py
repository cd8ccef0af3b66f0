"""retrieval/dense.py and the dense kind of retrieval/index.py, with the real MiniLM encoder."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import pytest
from retrieval_corpus import CORPUS, PARAPHRASES, TITLE_TO_ID

from retrieval.batching import BatchingRetriever
from retrieval.index import IndexLoadError, build_index, fingerprint, load_index
from retrieval.types import Passage, Retriever

faiss = pytest.importorskip("faiss", reason="the `dense` extra (faiss-cpu) is not installed")
from retrieval.dense import DenseRetriever  # noqa: E402

QUERIES = [q for q, _ in PARAPHRASES]
EXPECTED = [TITLE_TO_ID[t] for _, t in PARAPHRASES]


def search(r: Retriever, queries: list[str], k: int) -> list[list[Passage]]:
    return asyncio.run(r.search(queries, k))


def top1(r: Retriever, queries: list[str]) -> list[str]:
    return [hits[0].id for hits in search(r, queries, 1)]


def forget_file_records(index_dir: Path) -> None:
    """Drop the manifest's per-file sizes and digests, as in an index built before them."""
    manifest = json.loads((index_dir / "index.json").read_text())
    del manifest["files"]
    (index_dir / "index.json").write_text(json.dumps(manifest))


def assert_one_line_load_error(index_dir: Path, match: str, **kwargs) -> str:
    with pytest.raises(IndexLoadError, match=match) as info:
        load_index(index_dir, **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(index_dir) in message
    return message


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, corpus_file) -> Path:
    return build_index(corpus_file, tmp_path_factory.mktemp("dense"), "dense", show_progress=False)


@pytest.fixture
def dense_copy(dense_dir, tmp_path) -> Path:
    """A private copy of the built dense index, for tests that damage it."""
    out = tmp_path / "idx"
    out.mkdir()
    for name in os.listdir(dense_dir):
        (out / name).write_bytes((dense_dir / name).read_bytes())
    return out


def test_paraphrased_query_finds_its_passage_first(dense_flat):
    """Guards against: a dense path that is lexical in disguise, a wrong pooling (CLS instead of
    mean), or FAISS row ids mapped to the wrong passages; any of them loses paraphrases."""
    assert isinstance(dense_flat, Retriever)
    assert top1(dense_flat, QUERIES) == EXPECTED


def test_scores_are_inner_products_best_first(dense_flat, minilm):
    """Guards against: L2 distances (smaller is better) reported as scores, or a result order
    that is not best first."""
    [hits] = search(dense_flat, ["hospital for people with cardiac illness"], 5)
    scores = [p.score for p in hits]
    assert scores == sorted(scores, reverse=True) and len(hits) == 5
    q = minilm.encode_queries(["hospital for people with cardiac illness"])[0]
    p = minilm.encode_passages([f"{hits[0].title} {hits[0].text}"])[0]
    assert hits[0].score == pytest.approx(float(q @ p), abs=1e-5)


def test_k_is_clamped_and_degenerate_calls(dense_flat):
    """Guards against: FAISS padding results with id -1 (an IndexError, or passage -1 = the last
    one) when k exceeds the corpus, and crashes on empty batches or k <= 0."""
    [everything] = search(dense_flat, ["bridge"], 1000)
    assert len(everything) == len(CORPUS) == len({p.id for p in everything})
    assert search(dense_flat, [], 3) == []
    assert search(dense_flat, ["bridge", "bread"], 0) == [[], []]


def test_flat_hnsw_ivf_agree_on_top1(minilm, mixed_corpus):
    """Guards against: an HNSW or IVF index built with FAISS's default L2 metric (its "scores" are
    distances, smallest first) or with row ids that do not map back to the right passages."""
    flat = DenseRetriever.build(mixed_corpus, minilm, "flat")
    hnsw = DenseRetriever.build(mixed_corpus, minilm, "hnsw", m=16, ef_search=32)
    ivf = DenseRetriever.build(mixed_corpus, minilm, "ivf", nlist=2, nprobe=2)
    assert hnsw.params["faiss"] == {"kind": "hnsw", "m": 16, "ef_construction": 80, "ef_search": 32}
    assert ivf.params["faiss"] == {"kind": "ivf", "nlist": 2, "nprobe": 2}
    queries = QUERIES + [p["title"] for p in mixed_corpus[30::7]]
    expected = search(flat, queries, 1)
    for approximate in (hnsw, ivf):
        got = search(approximate, queries, 1)
        assert [h[0].id for h in got] == [h[0].id for h in expected]
        assert [h[0].score for h in got] == pytest.approx([h[0].score for h in expected], abs=1e-5)


def test_ivf_nlist_is_clamped_for_small_corpora(minilm):
    """Guards against: FAISS k-means failing or warning when asked for more cells than the corpus
    can train (>= 39 points per cell), and nprobe exceeding nlist."""
    ivf = DenseRetriever.build(CORPUS, minilm, "ivf", nlist=100, nprobe=8)
    assert ivf.params["faiss"] == {"kind": "ivf", "nlist": 1, "nprobe": 1}
    assert top1(ivf, QUERIES) == EXPECTED
    with pytest.raises(ValueError, match="unknown FAISS index kind"):
        DenseRetriever.build(CORPUS, minilm, "annoy")


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_load_round_trip_identical_results(minilm, mixed_corpus, tmp_path, kind):
    """Guards against: a saved index losing its search parameters (efSearch, nprobe), its passage
    order, or its vectors, so that a reloaded service answers differently."""
    built = DenseRetriever.build(mixed_corpus, minilm, kind, nlist=2, nprobe=1, ef_search=20)
    built.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(DenseRetriever.FILES)
    loaded = DenseRetriever.load(tmp_path, minilm)
    assert loaded.params == built.params and len(loaded) == len(built)
    queries = QUERIES + ["Posra Press", "who was born in 1910"]
    assert search(loaded, queries, 5) == search(built, queries, 5)


def test_dimension_mismatch_is_refused(dense_flat, make_tiny_encoder, tmp_path):
    """Guards against: searching a 384-d index with vectors of another width (FAISS would read
    past the query buffer or assert deep inside C++)."""
    from retrieval.encoder import Encoder

    dense_flat.save(tmp_path)
    narrow = Encoder(make_tiny_encoder(32))
    assert narrow.dim == 32
    with pytest.raises(ValueError, match="dimension mismatch.*384.*32|dimension mismatch.*32.*384"):
        DenseRetriever.load(tmp_path, narrow)


def test_build_index_dense_manifest_and_load(dense_dir, minilm):
    """Guards against: a dense manifest that does not record the encoder and FAISS params (caches
    would serve results of another model), or load_index returning an unbatched/unsearchable
    retriever."""
    manifest = json.loads((dense_dir / "index.json").read_text())
    assert manifest["kind"] == "dense" and manifest["n_passages"] == len(CORPUS)
    assert manifest["params"]["faiss"] == {"kind": "flat"}
    assert manifest["params"]["encoder"] == {
        "name": minilm.path.name,
        "config_sha256": minilm.config_sha256,
        "weights_sha256": minilm.weights_sha256,
        "query_prefix": "",
        "passage_prefix": "",
        "max_length": 256,
        "pooling": "mean",
        "dim": 384,
    }
    assert Path(manifest["encoder_path"]) == minilm.path.resolve()
    assert sorted(os.listdir(dense_dir)) == sorted(["index.json", *DenseRetriever.FILES])
    retriever = load_index(dense_dir)
    assert isinstance(retriever, BatchingRetriever)
    assert isinstance(retriever.inner, DenseRetriever)
    assert top1(retriever, QUERIES) == EXPECTED


def test_fingerprint_follows_encoder_and_faiss_params(dense_dir, corpus_file, tmp_path):
    """Guards against: a cache keyed on a fingerprint that ignores the encoder prefixes or the
    FAISS kind, serving results computed by another configuration."""
    base = fingerprint(dense_dir)
    again = build_index(corpus_file, tmp_path / "again", "dense", show_progress=False)
    assert fingerprint(again) == base
    for name, kwargs in [("prefix", {"query_prefix": "query: "}), ("hnsw", {"faiss_kind": "hnsw"})]:
        other = build_index(corpus_file, tmp_path / name, "dense", show_progress=False, **kwargs)
        assert fingerprint(other) != base
    with pytest.raises(ValueError, match="apply to dense and hybrid"):
        build_index(corpus_file, tmp_path / "bm25", query_prefix="query: ", show_progress=False)


def test_load_index_refuses_encoder_of_other_dimension(dense_dir, make_tiny_encoder):
    """Guards against: loading an index with an encoder whose embeddings have another width,
    found only when the first query crashes inside FAISS."""
    narrow = make_tiny_encoder(32)
    message = assert_one_line_load_error(dense_dir, "dimension mismatch", encoder_path=narrow)
    assert "32" in message and "384" in message


def test_load_index_refuses_other_encoder_of_same_dimension(dense_dir, make_tiny_encoder):
    """Guards against: silently searching an index with a different model of the same width,
    which returns confident nonsense."""
    other = make_tiny_encoder(384)
    assert_one_line_load_error(
        dense_dir, "not the one the index was built with", encoder_path=other
    )


def test_missing_encoder_directory(dense_dir, tmp_path):
    """Guards against: a FileNotFoundError traceback (or a hub lookup) when the encoder moved."""
    assert_one_line_load_error(
        dense_dir, "encoder directory .*nope.* not found", encoder_path=tmp_path / "nope"
    )


def test_recorded_encoder_gone_falls_back_to_bundled_same_model(dense_copy, minilm, tmp_path):
    """Guards against: an index built in another virtualenv (its recorded encoder path gone)
    failing to load although the bundled encoder is the very same model."""
    manifest = json.loads((dense_copy / "index.json").read_text())
    manifest["encoder_path"] = str(tmp_path / "old-venv" / "model")
    (dense_copy / "index.json").write_text(json.dumps(manifest))
    assert top1(load_index(dense_copy), QUERIES[:2]) == EXPECTED[:2]


def test_missing_faiss_file(dense_copy):
    """Guards against: a partially copied dense index loading as an empty one."""
    (dense_copy / "faiss.index").unlink()
    assert_one_line_load_error(dense_copy, "missing file.*faiss.index")


def test_corrupt_faiss_file(dense_copy):
    """Guards against: FAISS's multi-line C++ RuntimeError escaping load_index."""
    forget_file_records(dense_copy)  # else the size check refuses it first
    (dense_copy / "faiss.index").write_bytes(b"garbage" * 10)
    assert_one_line_load_error(dense_copy, "RuntimeError")


def test_faiss_file_of_other_size(dense_copy):
    """Guards against: passages.jsonl and the FAISS index disagreeing on the passage count, which
    maps a FAISS row to the wrong passage (or past the end)."""
    forget_file_records(dense_copy)  # else the size check refuses it first
    index = faiss.IndexFlatIP(384)
    index.add(np.eye(384, dtype=np.float32)[:5])
    faiss.write_index(index, str(dense_copy / "faiss.index"))
    assert_one_line_load_error(dense_copy, "passages but a FAISS index of 5")


# -- pooling: CLS for bge-style encoders, recorded in the manifest, used again for queries -------


def _direct_vectors(encoder_dir: Path, texts: list[str], pooling: str) -> np.ndarray:
    """Unit vectors computed with transformers alone: the first token's last hidden state or the
    masked mean of them, L2-normalised."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
    model = AutoModel.from_pretrained(encoder_dir, local_files_only=True).eval()
    enc = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state  # (B, T, dim)
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


@pytest.fixture(scope="module")
def cls_dir(tmp_path_factory, corpus_file) -> Path:
    out = tmp_path_factory.mktemp("dense-cls")
    return build_index(corpus_file, out, "dense", show_progress=False, pooling="cls")


def test_cls_pooling_is_recorded_and_used_for_queries(cls_dir, dense_dir, minilm):
    """Guards against a bge-style index embedded with the wrong pooling, or queries of a CLS index
    pooled by the mean (vectors from another space than its passages': silent nonsense)."""
    manifest = json.loads((cls_dir / "index.json").read_text())
    assert manifest["params"]["encoder"]["pooling"] == "cls"
    assert fingerprint(cls_dir) != fingerprint(dense_dir)
    queries = ["who painted the ceiling", QUERIES[0], "a much longer query " * 5]
    cls_want = _direct_vectors(minilm.path, queries, "cls")
    mean_want = _direct_vectors(minilm.path, queries, "mean")
    cases = ((cls_dir, cls_want, mean_want), (dense_dir, mean_want, cls_want))
    for index_dir, want, other in cases:
        got = load_index(index_dir).inner.encoder.encode_queries(queries)
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert np.abs(got - other).max() > 0.1
    # the passages were embedded the same way: FAISS holds the CLS vectors of their texts
    stored = faiss.read_index(str(cls_dir / "faiss.index")).reconstruct_n(0, 3)
    texts = [f"{p['title']} {p['text']}".strip() for p in CORPUS[:3]]
    np.testing.assert_allclose(stored, _direct_vectors(minilm.path, texts, "cls"), atol=1e-5)


def test_pooling_of_old_or_damaged_manifests(dense_copy):
    """Guards against indexes built before pooling was a choice (no "pooling" recorded) becoming
    unloadable, and against an unknown pooling in a manifest loading as something else."""
    manifest = json.loads((dense_copy / "index.json").read_text())
    del manifest["params"]["encoder"]["pooling"]
    (dense_copy / "index.json").write_text(json.dumps(manifest))
    assert load_index(dense_copy).inner.encoder.pooling == "mean"
    manifest["params"]["encoder"]["pooling"] = "max"
    (dense_copy / "index.json").write_text(json.dumps(manifest))
    assert_one_line_load_error(dense_copy, "unknown params.encoder.pooling 'max'")
    with pytest.raises(ValueError, match="unknown encoder pooling 'max'"):
        build_index(dense_copy / "passages.jsonl", dense_copy.parent / "x", "dense", pooling="max")
