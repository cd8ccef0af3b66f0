"""retrieval/index.py: build an index directory, load it back, refuse broken ones."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval.bm25 import BM25Retriever
from retrieval.index import IndexLoadError, build_index, fingerprint, load_index

REPO = Path(__file__).resolve().parents[2]
PEOPLE = [
    {"id": f"p{i}", "title": name, "text": f"{name} is a {job} born in {city}."}
    for i, (name, job, city) in enumerate(
        [
            ("Ada Lind", "painter", "Norvik"),
            ("Borin Kask", "chemist", "Estermoor"),
            ("Cira Moll", "sailor", "Quellstad"),
            ("Dov Tarn", "architect", "Norvik"),
            ("Elsa Quill", "composer", "Palm Harbor"),
            ("Fenn Oort", "painter", "Estermoor"),
        ]
    )
]


def write_corpus(path: Path, people=PEOPLE) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in people), encoding="utf-8")
    return path


@pytest.fixture
def built(tmp_path) -> Path:
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    return build_index(corpus, tmp_path / "idx", show_progress=False)


def forget_file_records(index_dir: Path) -> None:
    """Drop the manifest's per-file sizes and digests, as in an index built before they were
    recorded: the damage a test makes then reaches the loader's own checks, which still guard
    such indexes (and files replaced by others of the same size)."""
    manifest = json.loads((index_dir / "index.json").read_text())
    del manifest["files"]
    (index_dir / "index.json").write_text(json.dumps(manifest))


def assert_one_line_load_error(index_dir: Path, match: str) -> None:
    with pytest.raises(IndexLoadError, match=match) as info:
        load_index(index_dir)
    message = str(info.value)
    assert "\n" not in message
    assert str(index_dir) in message


def test_build_writes_manifest_and_loads(built, tmp_path):
    """Guards against: a manifest missing the fields caches and /ready rely on, or an index that
    loads but does not search."""
    manifest = json.loads((built / "index.json").read_text())
    assert manifest["kind"] == "bm25"
    assert manifest["n_passages"] == 6
    assert manifest["format_version"] == 1
    assert manifest["params"]["k1"] == 1.5 and "tokenizer" in manifest["params"]
    assert len(manifest["fingerprint"]) == 64 and len(manifest["corpus_sha256"]) == 64
    assert fingerprint(built) == manifest["fingerprint"]
    for name in BM25Retriever.FILES:
        assert (built / name).is_file()
    retriever = load_index(built)
    [[top, *_]] = asyncio.run(retriever.search(["Elsa Quill"], 2))
    assert top.id == "p4"


def test_fingerprint_follows_corpus_and_params(tmp_path):
    """Guards against: caches serving old results after the corpus or BM25 params changed, or
    missing every entry after an identical rebuild."""
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    base = fingerprint(build_index(corpus, tmp_path / "a", show_progress=False))
    assert fingerprint(build_index(corpus, tmp_path / "b", show_progress=False)) == base
    assert fingerprint(build_index(corpus, tmp_path / "c", show_progress=False, k1=1.2)) != base
    changed = write_corpus(tmp_path / "changed.jsonl", PEOPLE[:-1])
    assert fingerprint(build_index(changed, tmp_path / "d", show_progress=False)) != base


def test_build_is_reproducible_across_processes(tmp_path):
    """Guards against: bm25s numbering its vocabulary by iterating a set, which makes every build
    (string hashing is randomized per process) write different index files."""
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    code = (
        "import sys; from retrieval.index import build_index; "
        "build_index(sys.argv[1], sys.argv[2], show_progress=False)"
    )
    for seed, out in (("1", "x"), ("2", "y")):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run(
            [sys.executable, "-c", code, str(corpus), str(tmp_path / out)],
            cwd=REPO,
            env=env,
            check=True,
        )
    for name in ("vocab.index.json", "data.csc.index.npy", "indices.csc.index.npy"):
        assert (tmp_path / "x" / name).read_bytes() == (tmp_path / "y" / name).read_bytes()


def test_missing_directory(tmp_path):
    """Guards against: a typo in --index surfacing as a FileNotFoundError traceback."""
    assert_one_line_load_error(tmp_path / "nope", "no such directory")


def test_directory_without_manifest(built):
    """Guards against: loading a half-finished build (the manifest is written last)."""
    (built / "index.json").unlink()
    assert_one_line_load_error(built, "no index.json")


def test_corrupt_manifest(built):
    """Guards against: a JSONDecodeError (multi-line traceback) from a truncated index.json."""
    (built / "index.json").write_text('{"kind": "bm25", "finger')
    assert_one_line_load_error(built, "corrupt index.json")


def test_manifest_with_wrong_field_type(built):
    """Guards against: a KeyError/TypeError later on for a manifest that parses but is wrong."""
    manifest = json.loads((built / "index.json").read_text())
    manifest["n_passages"] = "six"
    (built / "index.json").write_text(json.dumps(manifest))
    assert_one_line_load_error(built, "'n_passages'")


def test_missing_index_file(built):
    """Guards against: a partially copied index directory loading as an empty index."""
    (built / "vocab.index.json").unlink()
    assert_one_line_load_error(built, "missing file.*vocab.index.json")


def test_passages_file_shorter_than_matrix(built):
    """Guards against: returning the wrong passage (or IndexError) for a document index once
    passages.jsonl and the BM25 matrix disagree."""
    forget_file_records(built)
    lines = (built / "passages.jsonl").read_text().splitlines(keepends=True)
    (built / "passages.jsonl").write_text("".join(lines[:-1]))
    assert_one_line_load_error(built, "5 passages")


def test_manifest_count_mismatch(built):
    """Guards against: serving an index whose files were replaced after the manifest was written."""
    manifest = json.loads((built / "index.json").read_text())
    manifest["n_passages"] = 7
    (built / "index.json").write_text(json.dumps(manifest))
    assert_one_line_load_error(built, "says 7 passages")


@pytest.mark.parametrize(
    ("array", "damage", "message"),
    [
        ("indices", lambda a: np.full_like(a, 10**6), "names documents outside its"),
        ("indptr", lambda a: np.r_[a[:1], a[-2:0:-1], a[-1:]], "pointers are not in order"),
        ("data", lambda a: np.full_like(a, np.nan), "not finite numbers"),
        ("indptr", lambda a: a[:-1], "terms, its vocabulary"),
    ],
)
def test_damaged_bm25_matrix(built, array, damage, message):
    """Guards against a damaged matrix that loads: out-of-range document ids crashed the first
    search (IndexError), reversed column pointers returned wrong passages with exit 0."""
    forget_file_records(built)
    path = built / f"{array}.csc.index.npy"
    np.save(path, damage(np.load(path)))
    assert_one_line_load_error(built, message)


def test_manifest_records_every_file_size_and_sha256(built):
    """Guards against a manifest that cannot tell a damaged or swapped file from the one built:
    each file the build wrote (and only those, not the manifest) is recorded as it is on disk."""
    import hashlib

    files = json.loads((built / "index.json").read_text())["files"]
    assert sorted(files) == sorted(BM25Retriever.FILES)
    for name, entry in files.items():
        data = (built / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_truncated_file_fails_the_load_naming_it(built):
    """Guards against a truncated copy (a full disk, an interrupted rsync) reaching bm25s or FAISS,
    whose errors do not say which file is short, or loading with part of its data."""
    data = (built / "vocab.index.json").read_bytes()
    (built / "vocab.index.json").write_bytes(data[: len(data) // 2])
    assert_one_line_load_error(built, f"vocab.index.json is {len(data) // 2} bytes, the manifest")


def test_a_flipped_byte_loads_but_does_not_verify(built):
    """Guards against load reading every byte (it checks sizes only: a multi-GB index would start
    slowly) and against verify missing damage that keeps the size."""
    from retrieval.index import verify_index

    assert all(check.ok for check in verify_index(built))
    path = built / "passages.jsonl"
    path.write_bytes(path.read_bytes().replace(b"composer", b"composEr"))  # one bit of a text
    load_index(built)
    [bad] = [check for check in verify_index(built) if not check.ok]
    assert bad.name == "passages.jsonl" and "sha256" in bad.problem


def test_an_index_without_file_records_still_loads(built):
    """Guards against indexes built before the per-file records becoming unloadable, and against
    verify reporting them as intact."""
    from retrieval.index import verify_index

    forget_file_records(built)
    assert len(load_index(built)) == 6
    assert verify_index(built) is None


@pytest.mark.parametrize(
    "files",
    [[], {"../x": {"size": 1, "sha256": "0"}}, {"a": {"size": "1", "sha256": "0"}}],
    ids=["list", "outside", "size-string"],
)
def test_malformed_file_records_are_one_line(built, files):
    """Guards against a KeyError/TypeError traceback from a hand-edited `files`, and a verify that
    reads files outside the index directory."""
    manifest = json.loads((built / "index.json").read_text())
    manifest["files"] = files
    (built / "index.json").write_text(json.dumps(manifest))
    assert_one_line_load_error(built, "'files' is not a map of sizes and digests")


def test_rebuild_in_place_replaces_index(tmp_path):
    """Guards against: a rebuild into an existing directory keeping the old manifest or passages."""
    out = tmp_path / "idx"
    build_index(write_corpus(tmp_path / "a.jsonl"), out, show_progress=False)
    build_index(write_corpus(tmp_path / "b.jsonl", PEOPLE[:3]), out, show_progress=False)
    assert json.loads((out / "index.json").read_text())["n_passages"] == 3
    assert len(load_index(out)) == 3


# -- the encoder of a dense index: identified by its weights, not its directory's name ----------


@pytest.fixture(scope="module")
def dense_people(tmp_path_factory, minilm) -> Path:
    """A dense index of PEOPLE built with the bundled MiniLM."""
    work = tmp_path_factory.mktemp("dense-people")
    corpus = write_corpus(work / "corpus.jsonl")
    return build_index(corpus, work / "idx", "dense", show_progress=False, encoder_path=minilm.path)


@pytest.fixture(scope="module")
def encoder_copies(tmp_path_factory, minilm) -> dict[str, Path]:
    """MiniLM copied under another name, and a "fine-tuned" copy: same config.json, perturbed
    weights (a real, loadable model that embeds differently)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    work = tmp_path_factory.mktemp("encoders")
    renamed = Path(shutil.copytree(minilm.path, work / "my-renamed-encoder"))
    # the name of the original: before the fix the name was all that was compared
    tuned = Path(shutil.copytree(minilm.path, work / "tuned" / minilm.path.name))
    weights = load_file(tuned / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        if tensor.dtype.is_floating_point and tensor.numel() > 1:
            noise = torch.randn(tensor.shape, generator=generator) * tensor.std()
            weights[name] = tensor + 0.5 * noise
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    return {"renamed": renamed, "tuned": tuned}


def test_dense_manifest_records_the_encoder_weights(dense_people, minilm):
    """Guards against a fine-tuned encoder (same config.json) loading an index silently: the
    manifest must record what `sha256sum model.safetensors` prints, so the fingerprint (and the
    caches keyed on it) follows the weights."""
    import hashlib

    recorded = json.loads((dense_people / "index.json").read_text())["params"]["encoder"]
    weights = (minilm.path / "model.safetensors").read_bytes()
    assert recorded["weights_sha256"] == hashlib.sha256(weights).hexdigest()


def test_a_renamed_copy_of_the_encoder_loads(dense_people, encoder_copies):
    """Guards against an encoder copied under another directory name failing with "params
    differ": the name was compared, though the weights are the same."""
    retriever = load_index(dense_people, encoder_path=encoder_copies["renamed"])
    [[top, *_]] = asyncio.run(retriever.search(["Elsa Quill the composer"], 2))
    assert top.id == "p4"


def test_a_fine_tuned_encoder_is_refused_in_one_line(dense_people, encoder_copies, minilm):
    """Guards against an encoder with the same config but other weights loading silently (its
    vectors do not match the index's: confident nonsense), and against an error that points to
    a flag no command has (`encoder_path=...`)."""
    with pytest.raises(IndexLoadError) as info:
        load_index(dense_people, encoder_path=encoder_copies["tuned"])
    message = str(info.value)
    assert "\n" not in message and str(dense_people) in message
    assert "not the one the index was built with" in message and "pass --encoder DIR" in message
    assert str(encoder_copies["tuned"]) in message  # the encoder found
    assert f"{minilm.path.name} at {minilm.path.resolve()}" in message  # the one recorded


def test_an_index_without_a_weights_hash_still_loads(dense_people, encoder_copies, tmp_path):
    """Guards against indexes built before the weights were recorded becoming unloadable."""
    import shutil

    old = Path(shutil.copytree(dense_people, tmp_path / "old"))
    manifest = json.loads((old / "index.json").read_text())
    del manifest["params"]["encoder"]["weights_sha256"]
    (old / "index.json").write_text(json.dumps(manifest))
    retriever = load_index(old, encoder_path=encoder_copies["renamed"])
    [[top, *_]] = asyncio.run(retriever.search(["Elsa Quill the composer"], 2))
    assert top.id == "p4"
