"""Recall@k of the gold passage on a world's 1-hop questions, for each given index (each half
of a hybrid index too).

The gold passage of a 1-hop question is the one titled with its entity (`entities[0]`); the
question text itself is the query, as a user would type it.

    .venv/bin/python -m bench.recall_demo --data artifacts/demo/world/test.jsonl \
        --index artifacts/demo/index [--index DIR ...] [--k 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from retrieval.index import load_index, read_manifest


async def recall(index_dir: Path, part: str, rows: list[dict], k: int) -> float:
    retriever = load_index(index_dir, part=part)
    results = await retriever.search([r["question"] for r in rows], k)
    golds = [r["entities"][0] for r in rows]
    hits = sum(gold in {p.title for p in ps} for gold, ps in zip(golds, results, strict=True))
    return hits / len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--index", type=Path, action="append", required=True)
    p.add_argument("--k", type=int, default=5)
    args = p.parse_args()
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["type"] == "1hop"]
    print(f"| index | kind | 1-hop questions | recall@{args.k} |\n|---|---|---|---|")
    for index_dir in args.index:
        kind = read_manifest(index_dir)["kind"]
        for part in ("bm25", "dense", "hybrid") if kind == "hybrid" else (kind,):
            value = asyncio.run(recall(index_dir, part, rows, args.k))
            print(f"| {index_dir} | {part} | {len(rows)} | {value:.3f} |")


if __name__ == "__main__":
    main()
