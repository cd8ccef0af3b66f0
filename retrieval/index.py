"""Index directories: build one from a corpus file, load one back as a `Retriever`.

Layout of an index directory (kind "bm25"):

    index.json               manifest, written last (a directory without it is an unfinished build)
    passages.jsonl           the passages, in index order: {"id", "title", "text"}
    params.index.json        bm25s: k1, b, method, num_docs, ...
    vocab.index.json         bm25s: token -> column
    data.csc.index.npy       bm25s: the sparse (n_docs, n_vocab) score matrix, CSC arrays
    indices.csc.index.npy
    indptr.csc.index.npy

The manifest's `fingerprint` = sha256(corpus bytes + kind + params) names the index's content:
caches key on it, so rebuilding from a changed corpus or with other params never serves stale hits.
"""

from __future__ import annotations

import hashlib
import json
import os
from os import PathLike
from pathlib import Path
from typing import Any

from retrieval.bm25 import BM25Retriever
from retrieval.corpus import iter_corpus
from retrieval.types import Retriever

MANIFEST = "index.json"
FORMAT_VERSION = 1

# kind -> backend class. A backend offers: build(passages, *, show_progress, **params) -> instance,
# load(dir), save(dir), params, __len__, FILES. Dense/FAISS registers here later.
_BACKENDS: dict[str, type[BM25Retriever]] = {"bm25": BM25Retriever}

_MANIFEST_FIELDS: dict[str, type] = {
    "kind": str,
    "fingerprint": str,
    "corpus_sha256": str,
    "n_passages": int,
    "params": dict,
    "format_version": int,
}


class IndexLoadError(Exception):
    """An index directory cannot be used; the message is one line and names the directory."""


def build_index(
    corpus_path: str | PathLike[str],
    out_dir: str | PathLike[str],
    kind: str = "bm25",
    *,
    show_progress: bool = True,
    **params: Any,
) -> Path:
    """Index `corpus_path` into `out_dir` (created; an old manifest there is removed first)."""
    if kind not in _BACKENDS:
        raise ValueError(f"unknown index kind {kind!r}; known: {sorted(_BACKENDS)}")
    corpus_path, out_dir = Path(corpus_path), Path(out_dir)
    backend = _BACKENDS[kind].build(iter_corpus(corpus_path), show_progress=show_progress, **params)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # no manifest until every file is consistent
    backend.save(out_dir)
    corpus_sha256, fp = _hashes(corpus_path, kind, backend.params)
    manifest = {
        "kind": kind,
        "fingerprint": fp,
        "corpus_sha256": corpus_sha256,
        "n_passages": len(backend),
        "params": backend.params,
        "format_version": FORMAT_VERSION,
    }
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / MANIFEST)
    return out_dir


def load_index(index_dir: str | PathLike[str]) -> Retriever:
    """The retriever stored in `index_dir`, checked against its manifest; else `IndexLoadError`."""
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    backend_cls = _BACKENDS[manifest["kind"]]
    missing = [name for name in backend_cls.FILES if not (index_dir / name).is_file()]
    if missing:
        raise _error(index_dir, f"missing file(s): {', '.join(missing)}")
    try:
        backend = backend_cls.load(index_dir)
    except Exception as exc:  # third-party formats (numpy, orjson, bm25s): map at the boundary
        raise _error(index_dir, f"{type(exc).__name__}: {exc}") from exc
    if len(backend) != manifest["n_passages"]:
        raise _error(
            index_dir, f"{MANIFEST} says {manifest['n_passages']} passages, files {len(backend)}"
        )
    if backend.params != manifest["params"]:
        raise _error(
            index_dir, f"params differ: {MANIFEST} has {manifest['params']}, files {backend.params}"
        )
    return backend


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
    if manifest["kind"] not in _BACKENDS:
        raise _error(index_dir, f"unknown index kind {manifest['kind']!r}")
    return manifest


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
