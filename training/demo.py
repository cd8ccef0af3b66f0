"""Build the demo artifacts that `make serve` needs, skipping whatever already exists.

artifacts/demo/world/   the demo world (seed 0): corpus.jsonl, train/dev/test.jsonl, world.json
artifacts/demo/world2/  a second world (seed 1, unseen names) for the generalization test
artifacts/demo/index/   BM25 index over world/corpus.jsonl
artifacts/demo/index2/  BM25 index over world2/corpus.jsonl
artifacts/demo/sft/     the SFT checkpoint (committed; retrained only when missing)
"""

from __future__ import annotations

from pathlib import Path

from retrieval.outputs import clear_unfinished

DEMO_SEED, SECOND_SEED = 0, 1


def build_demo(out: Path) -> None:
    build_demo_data(out)
    if not (out / "sft" / "config.json").is_file():
        from training.sft import SFTConfig, run_sft

        print(f"training {out / 'sft'} (no committed checkpoint found)")
        clear_unfinished(out / "sft")
        run_sft(SFTConfig(out=out / "sft"))
    print(f"demo artifacts ready in {out}")


def build_demo_data(out: Path) -> None:
    """The generated part of the demo (worlds and index): about a second, no training."""
    from retrieval.index import build_index, built_from
    from training.world import build_world

    out.mkdir(parents=True, exist_ok=True)
    for name, seed in (("world", DEMO_SEED), ("world2", SECOND_SEED)):
        if not (out / name / "world.json").is_file():  # written last: the world is complete
            print(f"building {out / name} (seed {seed})")
            clear_unfinished(out / name)
            build_world(out / name, seed)
    for world, index in (("world", "index"), ("world2", "index2")):
        corpus = out / world / "corpus.jsonl"
        if not built_from(out / index, corpus):
            print(f"building {out / index}")
            clear_unfinished(out / index)
            build_index(corpus, out / index)
