"""Benchmark: what KV reuse across search rounds saves in the embedded engine.

Runs the same questions through the full agent loop (greedy, real BM25 retrieval) twice: with
session reuse (the default) and with reuse disabled (`max_sessions=0`, so every round re-runs
the whole context, as the research repos' offline loops do). Prints prefill tokens and wall time
per configuration and their ratio; both runs must produce identical trajectories.

  .venv/bin/python -m bench.bench_prefix_reuse --model artifacts/demo/sft \
      --index artifacts/demo/index --data artifacts/demo/world/test.jsonl --n 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from agent.checkpoint import load_format, load_tokenizer
from agent.events import Finished
from agent.hf_engine import TransformersEngine
from agent.loop import AgentLoop, RunParams
from retrieval.index import load_index


async def run_all(loop: AgentLoop, questions: list[str]) -> list[list[int]]:
    out = []
    for q in questions:
        async for event in loop.run(loop.prompt_ids(q), RunParams()):
            if isinstance(event, Finished):
                out.append(event.trajectory.completion_ids)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--n", type=int, default=40)
    args = p.parse_args()
    rows = [json.loads(x) for x in args.data.read_text().splitlines() if x.strip()]
    multi = [r["question"] for r in rows if r.get("hops", 1) >= 2][: args.n // 2]
    single = [r["question"] for r in rows if r.get("hops", 1) == 1][: args.n - len(multi)]
    questions = single + multi
    fmt = load_format(args.model)
    tok = load_tokenizer(args.model, fmt)
    retriever = load_index(args.index)
    results = {}
    for name, sessions in (("reuse", 32), ("no reuse", 0)):
        engine = TransformersEngine(args.model, tok, device="cpu", max_sessions=sessions)
        loop = AgentLoop(engine, retriever, fmt)
        start = time.perf_counter()
        trajectories = asyncio.run(run_all(loop, questions))
        results[name] = (time.perf_counter() - start, engine.stats, trajectories)
    assert results["reuse"][2] == results["no reuse"][2], "reuse changed the output"
    print(f"{len(questions)} questions ({len(single)} 1-hop, {len(multi)} multi-hop), greedy")
    print(f"{'config':<10} {'wall s':>8} {'prefill tok':>12} {'reused tok':>11} {'decode tok':>11}")
    for name, (wall, stats, _) in results.items():
        print(
            f"{name:<10} {wall:>8.2f} {stats.prefill_tokens:>12} {stats.reused_tokens:>11} "
            f"{stats.decode_tokens:>11}"
        )
    (w1, s1, _), (w0, s0, _) = results["reuse"], results["no reuse"]
    print(f"prefill tokens saved: {1 - s1.prefill_tokens / s0.prefill_tokens:.1%}")
    print(f"wall-time ratio (no reuse / reuse): {w0 / w1:.2f}x")


if __name__ == "__main__":
    main()
