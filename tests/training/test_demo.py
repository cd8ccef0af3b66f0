"""`searchagent demo build`: what `make serve` runs before serving."""

from __future__ import annotations

import shutil

from training.demo import build_demo


def test_demo_build_makes_missing_artifacts_and_keeps_existing_ones(tmp_path, tiny_checkpoint):
    """Guards against `make serve` rebuilding (or retraining) what already exists, and against
    it serving without a world or an index."""
    shutil.copytree(tiny_checkpoint, tmp_path / "sft")
    build_demo(tmp_path)
    for path in ("world/corpus.jsonl", "world/test.jsonl", "world2/test.jsonl", "index/index.json"):
        assert (tmp_path / path).is_file(), path
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    build_demo(tmp_path)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps
    names = {
        line.split('"title": "')[1].split('"')[0] for line in open(tmp_path / "world/corpus.jsonl")
    }
    names2 = {
        line.split('"title": "')[1].split('"')[0] for line in open(tmp_path / "world2/corpus.jsonl")
    }
    assert len(names & names2) < 0.05 * len(names)  # the second world's names are unseen


def test_demo_build_never_deletes_what_it_did_not_write(tmp_path, tiny_checkpoint):
    """Guards against data loss: `demo build --out DIR` (and `train pipeline`) removed any
    `world`, `index` or `sft` folder of DIR that lacked its marker file, a user's files included.
    Only an interrupted build's scratch (`.partial`) is cleared; anything else is refused with a
    one-line error."""
    import pytest

    from retrieval.outputs import clear_unfinished

    shutil.copytree(tiny_checkpoint, tmp_path / "sft")
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"world is not empty and holds no world \(no world.json"):
        build_demo(tmp_path)
    assert (tmp_path / "world" / "notes.txt").read_text() == "mine"
    (tmp_path / "interrupted" / ".partial").mkdir(parents=True)
    clear_unfinished(tmp_path / "interrupted")
    assert not (tmp_path / "interrupted").exists()
    clear_unfinished(tmp_path / "world")
    assert (tmp_path / "world" / "notes.txt").read_text() == "mine"
