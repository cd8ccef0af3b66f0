"""Index directories: build one from a corpus file, load it back as a `Retriever`.

Three kinds. "bm25" (the default):

    index.json               manifest, written last (a directory without it is an unfinished build)
    passages.jsonl           the passages, in index order: {"id", "title", "text"}
    params.index.json        bm25s: k1, b, method, num_docs, ...
    vocab.index.json         bm25s: token -> column
    data.csc.index.npy       bm25s: the sparse (n_docs, n_vocab) score matrix, CSC arrays
    indices.csc.index.npy
    indptr.csc.index.npy

"dense": `index.json`, `passages.jsonl`, and `faiss.index` (FAISS inner-product index holding the
passage embeddings). "hybrid": `index.json` over two sub-indexes without manifests of their own,
`bm25/` (the bm25 files) and `dense/` (the dense files).

The manifest's `fingerprint` = sha256(corpus bytes + kind + params) names the index's content:
caches key on it, so rebuilding from a changed corpus or with other params never serves stale hits.
For dense and hybrid indexes the params record the FAISS index (kind, m/ef or nlist/nprobe) and the
encoder: its directory name, the sha256 of its config.json and of its weights, prefixes,
max_length, pooling (mean, or CLS for bge-style encoders; queries are pooled as recorded, and a
manifest without it means mean) and dimension. Where the encoder lives (`encoder_path`) is
recorded beside the params, outside the fingerprint: moving a virtualenv does not change what an
index returns. At load the encoder is identified by its weights and config, never by its
directory's name (a renamed copy loads, a fine-tuned one with the same config does not); indexes
built before the weights were recorded skip that comparison. `load_index` wraps the dense part in
a `BatchingRetriever`, so concurrent queries share one encoder/FAISS call.

The manifest's `files` records each file's size and sha256 (`retrieval.integrity`): loading
compares the sizes, `verify_index` the digests; indexes built before it skip both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from retrieval.batching import BatchingRetriever
from retrieval.bm25 import BM25Retriever
from retrieval.corpus import iter_corpus, read_corpus
from retrieval.hybrid import HybridRetriever
from retrieval.integrity import (
    FileCheck,
    file_sha256,
    record_files,
    size_mismatch,
    valid_records,
    verify_files,
)
from retrieval.outputs import staged_dir
from retrieval.types import Retriever

if TYPE_CHECKING:  # faiss and torch only when a dense index is built or loaded
    from retrieval.dense import DenseRetriever
    from retrieval.encoder import Encoder

MANIFEST = "index.json"
FORMAT_VERSION = 1
KINDS = ("bm25", "dense", "hybrid")
_BM25_PARAMS = frozenset({"k1", "b"})
_FUSION_PARAMS = frozenset({"k_rrf", "depth"})
_ENCODER_FIELDS: dict[str, type] = {
    "name": str,
    "config_sha256": str,
    "query_prefix": str,
    "passage_prefix": str,
    "max_length": int,
    "dim": int,
}
_MANIFEST_FIELDS: dict[str, type] = {
    "kind": str,
    "fingerprint": str,
    "corpus_sha256": str,
    "n_passages": int,
    "params": dict,
    "format_version": int,
}
_T = TypeVar("_T")


class IndexLoadError(Exception):
    """An index directory cannot be used; the message is one line and names the directory."""


def build_index(
    corpus_path: str | PathLike[str],
    out_dir: str | PathLike[str],
    kind: str = "bm25",
    *,
    show_progress: bool = True,
    encoder_path: str | PathLike[str] | None = None,
    faiss_kind: str = "flat",
    query_prefix: str = "",
    passage_prefix: str = "",
    max_length: int | None = None,
    pooling: str = "mean",
    **params: Any,
) -> Path:
    """Index `corpus_path` into `out_dir`: new, empty, or an earlier index, which the new one
    replaces only once it is complete (`retrieval.outputs.staged_dir`: a failed or interrupted
    build leaves `out_dir` as it was).

    `params` go to the backends: k1/b to BM25, k_rrf/depth to the fusion of a hybrid index, the
    rest (m, ef_construction, ef_search, nlist, nprobe) to `DenseRetriever.build`. The encoder
    defaults to the bundled all-MiniLM-L6-v2 (`retrieval.encoder.default_encoder_path`);
    `max_length` (its tokens per text, default 256) and `pooling` ("mean" or "cls") are recorded
    and used again at load, so queries are embedded as the passages were.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; known: {list(KINDS)}")
    dense_only = encoder_path is not None or query_prefix or passage_prefix or faiss_kind != "flat"
    if kind == "bm25" and (dense_only or max_length is not None or pooling != "mean"):
        raise ValueError(
            "encoder_path, faiss_kind, prefixes, max_length and pooling apply to dense and hybrid "
            "indexes"
        )
    encoder_args: dict[str, Any] = {
        "query_prefix": query_prefix,
        "passage_prefix": passage_prefix,
        "pooling": pooling,
    }
    if max_length is not None:
        encoder_args["max_length"] = max_length
    corpus_path, out_dir = Path(corpus_path), Path(out_dir)
    if not corpus_path.is_file():
        what = "a directory, not a corpus file" if corpus_path.is_dir() else "not found"
        raise FileNotFoundError(f"corpus {corpus_path}: {what}")
    with staged_dir(out_dir, MANIFEST, "index") as work:
        _write_index(
            corpus_path, work, kind, show_progress, encoder_path, faiss_kind, encoder_args, params
        )
    return out_dir


def _write_index(
    corpus_path: Path,
    out_dir: Path,
    kind: str,
    show_progress: bool,
    encoder_path: str | PathLike[str] | None,
    faiss_kind: str,
    encoder_args: dict[str, Any],
    params: dict[str, Any],
) -> None:
    extra: dict[str, Any] = {}
    if kind == "bm25":
        bm25 = BM25Retriever.build(iter_corpus(corpus_path), show_progress=show_progress, **params)
        bm25.save(out_dir)
        n_passages, index_params = len(bm25), bm25.params
    else:
        from retrieval.dense import DenseRetriever
        from retrieval.encoder import Encoder, default_encoder_path

        path = Path(encoder_path) if encoder_path is not None else default_encoder_path()
        encoder = Encoder(path, **encoder_args)
        passages = read_corpus(corpus_path)
        split = _split_params(kind, params)
        dense = DenseRetriever.build(
            passages, encoder, faiss_kind, show_progress=show_progress, **split["dense"]
        )
        n_passages, index_params = len(dense), dense.params
        if kind == "dense":
            dense.save(out_dir)
        else:
            bm25 = BM25Retriever.build(passages, show_progress=show_progress, **split["bm25"])
            fusion = HybridRetriever(bm25, dense, **split["fusion"]).params
            bm25.save(out_dir / "bm25")
            dense.save(out_dir / "dense")
            index_params = {"bm25": bm25.params, "dense": dense.params, "fusion": fusion}
        extra["encoder_path"] = str(path.resolve())
    corpus_sha256, fp = _hashes(corpus_path, kind, index_params)
    manifest = {
        "kind": kind,
        "fingerprint": fp,
        "corpus_sha256": corpus_sha256,
        "n_passages": n_passages,
        "params": index_params,
        "format_version": FORMAT_VERSION,
        **extra,
        "files": record_files(out_dir, MANIFEST),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _split_params(kind: str, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Route build params: BM25's and the fusion's by name (hybrid only), the rest to FAISS."""
    split: dict[str, dict[str, Any]] = {"bm25": {}, "fusion": {}, "dense": {}}
    for name, value in params.items():
        if kind == "hybrid" and name in _BM25_PARAMS:
            split["bm25"][name] = value
        elif kind == "hybrid" and name in _FUSION_PARAMS:
            split["fusion"][name] = value
        else:
            split["dense"][name] = value
    return split


def load_index(
    index_dir: str | PathLike[str],
    *,
    encoder_path: str | PathLike[str] | None = None,
    max_batch: int = 64,
    max_wait_ms: float = 0.0,
    part: str | None = None,
) -> Retriever:
    """The retriever stored in `index_dir`, checked against its manifest; else `IndexLoadError`.

    A dense or hybrid index loads its encoder from `encoder_path`, else from the directory recorded
    at build time, else the bundled default if it is the same model. Its dense part comes wrapped
    in `BatchingRetriever(max_batch, max_wait_ms)`. `part` ("bm25", "dense" or "hybrid") asks for
    one backend: the index's own kind, or one half of a hybrid index.
    """
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    kind, params = manifest["kind"], manifest["params"]
    if (changed := size_mismatch(index_dir, manifest.get("files", {}))) is not None:
        hint = "truncated or replaced since the build; `searchagent index verify` checks every file"
        raise _error(index_dir, f"{changed}: {hint}")
    if part is not None and part != kind:
        if part not in KINDS:
            raise _error(index_dir, f"unknown retriever {part!r}; known: {list(KINDS)}")
        if kind != "hybrid" or part == "hybrid":
            raise _error(
                index_dir,
                f"it is a {kind} index, not {part}; build one with "
                f"`searchagent index build --kind {part}`",
            )
        if part == "bm25":
            sub = _sub_params(index_dir, params, "bm25")
            return _load_bm25(index_dir, index_dir / "bm25", manifest, sub)
    if kind == "bm25":
        return _load_bm25(index_dir, index_dir, manifest, params)
    try:
        from retrieval.dense import DenseRetriever
    except ImportError as exc:
        raise _error(index_dir, f"a {kind} index needs faiss-cpu and torch: {exc}") from exc
    dense_dir = index_dir if kind == "dense" else index_dir / "dense"
    _check_files(index_dir, dense_dir, DenseRetriever.FILES)  # before the (slow) encoder load
    if kind == "hybrid":
        _check_files(index_dir, index_dir / "bm25", BM25Retriever.FILES)
    dense_params = params if kind == "dense" else _sub_params(index_dir, params, "dense")
    encoder = _load_encoder(index_dir, manifest, dense_params, encoder_path)
    dense = _guarded(index_dir, lambda: DenseRetriever.load(dense_dir, encoder))
    _check_backend(index_dir, manifest, dense, dense_params)
    batched = BatchingRetriever(dense, max_batch=max_batch, max_wait_ms=max_wait_ms)
    if kind == "dense" or part == "dense":
        return batched
    bm25 = _load_bm25(
        index_dir, index_dir / "bm25", manifest, _sub_params(index_dir, params, "bm25")
    )
    fusion = _sub_params(index_dir, params, "fusion")
    return _guarded(index_dir, lambda: HybridRetriever(bm25, batched, **fusion))


def _load_bm25(
    index_dir: Path, directory: Path, manifest: dict[str, Any], params: dict[str, Any]
) -> BM25Retriever:
    _check_files(index_dir, directory, BM25Retriever.FILES)
    bm25 = _guarded(index_dir, lambda: BM25Retriever.load(directory))
    _check_backend(index_dir, manifest, bm25, params)
    return bm25


def _load_encoder(
    index_dir: Path,
    manifest: dict[str, Any],
    params: dict[str, Any],
    encoder_path: str | PathLike[str] | None,
) -> Encoder:
    """The encoder the index was built with, or `IndexLoadError` saying why not."""
    from retrieval.encoder import (
        POOLINGS,
        Encoder,
        config_sha256,
        default_encoder_path,
        weights_sha256,
    )

    recorded = params.get("encoder")
    if not isinstance(recorded, dict) or any(
        not isinstance(recorded.get(f), t) for f, t in _ENCODER_FIELDS.items()
    ):
        raise _error(index_dir, f"corrupt {MANIFEST}: params.encoder missing or malformed")
    pooling = recorded.get("pooling", "mean")  # absent from the earliest indexes: all mean
    if pooling not in POOLINGS:
        raise _error(index_dir, f"corrupt {MANIFEST}: unknown params.encoder.pooling {pooling!r}")
    want = recorded.get("weights_sha256")  # absent from indexes built before it was recorded
    if want is not None and not isinstance(want, str):
        raise _error(index_dir, f"corrupt {MANIFEST}: params.encoder.weights_sha256 not a string")
    built_with = f"{recorded['name']} at {manifest.get('encoder_path', '?')}"
    if want is not None:
        built_with += f", weights sha256 {want[:12]}"
    hint = f"pass --encoder DIR (SEARCHAGENT_ENCODER), the encoder it was built with ({built_with})"
    path = Path(encoder_path or manifest.get("encoder_path") or recorded["name"])
    if encoder_path is None and not path.is_dir():
        try:  # the index was built elsewhere (another venv): the bundled encoder, if the same
            default = default_encoder_path()
            same = config_sha256(default) == recorded["config_sha256"]
            if same and (want is None or weights_sha256(default) == want):
                path = default
        except (OSError, ValueError):
            pass
    if not (path / "config.json").is_file():
        raise _error(index_dir, f"encoder directory {path} not found; {hint}")
    encoder = _guarded(
        index_dir,
        lambda: Encoder(
            path,
            query_prefix=recorded["query_prefix"],
            passage_prefix=recorded["passage_prefix"],
            max_length=recorded["max_length"],
            pooling=pooling,
        ),
    )
    if encoder.dim != recorded["dim"]:
        raise _error(
            index_dir,
            f"embedding dimension mismatch: encoder {path} embeds into {encoder.dim} dimensions, "
            f"the index holds {recorded['dim']}-dimensional vectors; {hint}",
        )
    if encoder.config_sha256 != recorded["config_sha256"]:
        raise _error(
            index_dir,
            f"encoder {path} is not the one the index was built with "
            f"(config.json sha256 {encoder.config_sha256[:12]}, "
            f"index has {recorded['config_sha256'][:12]}); {hint}",
        )
    if want is not None and encoder.weights_sha256 != want:  # fine-tuned: same config and width
        raise _error(
            index_dir,
            f"encoder {path} is not the one the index was built with (its weights sha256 is "
            f"{encoder.weights_sha256[:12]}); {hint}",
        )
    return encoder


def _sub_params(index_dir: Path, params: dict[str, Any], part: str) -> dict[str, Any]:
    sub = params.get(part)
    if not isinstance(sub, dict):
        raise _error(index_dir, f"corrupt {MANIFEST}: params.{part} missing or not an object")
    return sub


def _check_files(index_dir: Path, directory: Path, names: tuple[str, ...]) -> None:
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        shown = [str((directory / name).relative_to(index_dir)) for name in missing]
        raise _error(index_dir, f"missing file(s): {', '.join(shown)}")


def _guarded(index_dir: Path, load: Callable[[], _T]) -> _T:
    """Run `load`; third-party errors (numpy, bm25s, FAISS, transformers) become ours here."""
    try:
        return load()
    except IndexLoadError:
        raise
    except Exception as exc:
        raise _error(index_dir, f"{type(exc).__name__}: {exc}") from exc


def _check_backend(
    index_dir: Path,
    manifest: dict[str, Any],
    backend: BM25Retriever | DenseRetriever,
    params: dict[str, Any],
) -> None:
    """The loaded files must match what the manifest says about them."""
    if len(backend) != manifest["n_passages"]:
        raise _error(
            index_dir, f"{MANIFEST} says {manifest['n_passages']} passages, files {len(backend)}"
        )
    found = backend.params
    if "encoder" in found:  # `_load_encoder` checked it: weights, config, dimension, not its name
        found = {**found, "encoder": params.get("encoder")}
    if found != params:
        raise _error(index_dir, f"params differ: {MANIFEST} has {params}, files {found}")


def read_manifest(index_dir: str | PathLike[str]) -> dict[str, Any]:
    """The validated `index.json` of `index_dir`; `IndexLoadError` if absent or malformed."""
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise _error(index_dir, "no such directory")
    path = index_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _error(index_dir, f"no {MANIFEST} (not an index, or an unfinished build)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _error(index_dir, f"corrupt {MANIFEST}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise _error(index_dir, f"corrupt {MANIFEST}: not a JSON object")
    for field, typ in _MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(field), typ):
            reason = f"corrupt {MANIFEST}: {field!r} missing or not a {typ.__name__}"
            raise _error(index_dir, reason)
    if manifest["format_version"] != FORMAT_VERSION:
        version = manifest["format_version"]
        raise _error(index_dir, f"format_version {version}, expected {FORMAT_VERSION}")
    if manifest["kind"] not in KINDS:
        raise _error(index_dir, f"unknown index kind {manifest['kind']!r}")
    if "files" in manifest and not valid_records(manifest["files"]):
        raise _error(index_dir, f"corrupt {MANIFEST}: 'files' is not a map of sizes and digests")
    return manifest


def verify_index(index_dir: str | PathLike[str]) -> list[FileCheck] | None:
    """Every file the manifest records, checked against its size and full sha256 (slow: reads
    the whole index); None for an index built before the digests were recorded, or whose
    manifest records none (every build writes files: an empty record is not a verified index)."""
    index_dir = Path(index_dir)
    records = read_manifest(index_dir).get("files")
    return verify_files(index_dir, records) if records else None


def built_from(index_dir: str | PathLike[str], corpus_path: str | PathLike[str]) -> bool:
    """Whether `index_dir` holds a finished index of `corpus_path` as the file is now (a corpus
    rewritten since, say a world rebuilt with another seed, leaves a stale index behind)."""
    try:
        recorded = read_manifest(index_dir)["corpus_sha256"]
    except IndexLoadError:
        return False
    return recorded == file_sha256(Path(corpus_path))


def fingerprint(index_dir: str | PathLike[str]) -> str:
    """The content fingerprint from the manifest (cheap: does not load the index)."""
    return read_manifest(index_dir)["fingerprint"]


def _hashes(corpus_path: Path, kind: str, params: dict[str, Any]) -> tuple[str, str]:
    """(sha256 of the corpus file, fingerprint) in one read of the file."""
    corpus, fp = hashlib.sha256(), hashlib.sha256()
    with corpus_path.open("rb") as f:
        while chunk := f.read(1 << 20):
            corpus.update(chunk)
            fp.update(chunk)
    fp.update(b"\0" + kind.encode() + b"\0" + json.dumps(params, sort_keys=True).encode())
    return corpus.hexdigest(), fp.hexdigest()


def _error(index_dir: Path, reason: str) -> IndexLoadError:
    return IndexLoadError(f"cannot load index {index_dir}: {' '.join(reason.split())}")
