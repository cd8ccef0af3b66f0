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
