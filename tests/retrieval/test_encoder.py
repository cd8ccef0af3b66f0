"""retrieval/encoder.py: the real MiniLM encoder — shapes, norms, order, prefixes, offline load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def test_embeddings_are_unit_float32_rows(minilm):
    """Guards against: un-normalised or float64 vectors, which make inner-product scores
    meaningless (and FAISS rejects float64)."""
    vectors = minilm.encode(["a painter born in Norvik", "x", "The quick brown fox. " * 40])
    assert vectors.shape == (3, 384) and minilm.dim == 384
    assert vectors.dtype == np.float32 and vectors.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert minilm.encode([]).shape == (0, 384)


def test_length_sorted_batches_keep_input_order(minilm):
    """Guards against: returning vectors in the length-sorted order used for batching, or padding
    leaking into the mean (a padded text would then embed differently from the same text alone)."""
    texts = ["a much longer sentence about harbours, ships and lighthouses", "bread", "violin"]
    together = minilm.encode(texts)
    alone = np.stack([minilm.encode([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_prefixes_are_prepended(minilm):
    """Guards against: e5/bge-style prefixes configured but never applied, or applied to the wrong
    side (queries vs passages)."""
    from retrieval.encoder import Encoder

    prefixed = Encoder(minilm.path, query_prefix="query: ", passage_prefix="passage: ")
    q, p = "where is the bakery", "Velmora Bakery sells rye bread."
    np.testing.assert_allclose(
        prefixed.encode_queries([q]), minilm.encode(["query: " + q]), atol=1e-6
    )
    np.testing.assert_allclose(
        prefixed.encode_passages([p]), minilm.encode(["passage: " + p]), atol=1e-6
    )
    assert prefixed.describe()["query_prefix"] == "query: "
    assert prefixed.describe()["config_sha256"] == minilm.describe()["config_sha256"]


def test_missing_directory_is_a_clear_error(tmp_path):
    """Guards against: a mistyped encoder path being taken for a hub model id (a network call or
    a confusing hub error) instead of failing at once."""
    from retrieval.encoder import Encoder

    with pytest.raises(FileNotFoundError, match="no config.json"):
        Encoder(tmp_path / "nope")


def test_loads_offline_and_bm25_path_never_imports_torch(minilm, corpus_file, tmp_path):
    """Guards against: the encoder reaching for a model hub (it must load with the network cut),
    and the BM25 path of `retrieval` importing torch or faiss (the service runs without them)."""
    code = (
        "import sys, asyncio\n"
        "import retrieval\n"
        "from retrieval.index import build_index, load_index\n"
        f"build_index({str(corpus_file)!r}, {str(tmp_path / 'bm25')!r}, show_progress=False)\n"
        f"r = load_index({str(tmp_path / 'bm25')!r})\n"
        "assert asyncio.run(r.search(['Kessel Bridge'], 1))[0][0].id == 't15'\n"
        "assert 'torch' not in sys.modules and 'faiss' not in sys.modules, 'heavy import'\n"
        "from retrieval.encoder import Encoder, default_encoder_path\n"
        "assert Encoder(default_encoder_path()).dim == 384\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env["PATH"] = "/usr/bin:/bin"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)


def test_onnx_runtime_gives_torch_vectors(minilm):
    """Guards against: the ONNX Runtime export drifting from torch (an index built with one runtime
    and searched with the other would rank differently), pooling that ignores the padding mask in
    the exported graph, and the exporter leaving the torch model in training mode (dropout)."""
    from retrieval.encoder import Encoder

    assert minilm.runtime == "onnx"  # onnxruntime is part of the `dense` extra
    on_torch = Encoder(minilm.path, runtime="torch")
    assert on_torch.runtime == "torch"
    texts = ["bread", "a painter born in Norvik who later moved to Velmora", "The fox. " * 60]
    np.testing.assert_allclose(minilm.encode(texts), on_torch.encode(texts), atol=1e-5)
    assert not minilm._model.training
    assert minilm.describe() == on_torch.describe()  # same vectors, so the same fingerprint
    with pytest.raises(ValueError, match="unknown encoder runtime 'tensorrt'"):
        Encoder(minilm.path, runtime="tensorrt")


def test_onnx_export_pools_the_first_token_for_cls(minilm):
    """Guards against the ONNX export baking in mean pooling: a CLS encoder on ONNX Runtime would
    embed queries unlike the passages its index holds (or silently stay on torch)."""
    from retrieval.encoder import Encoder

    texts = ["bread", "a painter born in Norvik who later moved to Velmora", "mid length text"]
    on_onnx = Encoder(minilm.path, pooling="cls", runtime="onnx")
    on_torch = Encoder(minilm.path, pooling="cls", runtime="torch")
    assert on_onnx.runtime == "onnx" and on_onnx.describe()["pooling"] == "cls"
    np.testing.assert_allclose(on_onnx.encode(texts), on_torch.encode(texts), atol=1e-5)
    assert np.abs(on_onnx.encode(texts) - minilm.encode(texts)).max() > 0.1  # not the mean


def test_an_encoder_with_damaged_weights_is_a_one_line_error(tmp_path):
    """Guards against a traceback from `index build --kind dense --encoder DIR` when DIR's
    weights are truncated (the build path had no guard; loading an index had one)."""
    import shutil

    from retrieval.encoder import default_encoder_path

    damaged = tmp_path / "enc"
    shutil.copytree(default_encoder_path(), damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "1", "title": "A", "text": "a painter"}\n')
    out = tmp_path / "idx"
    cmd = [sys.executable, "-m", "service.cli", "index", "build", "--corpus", str(corpus),
           "--out", str(out), "--kind", "dense", "--encoder", str(damaged)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"searchagent: cannot load an encoder from {damaged}: "
        "Error while deserializing header: invalid header length"
    )
    assert not out.exists()
