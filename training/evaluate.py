"""Evaluation: EM, cover-EM and F1 with HotpotQA's official answer normalization (R1-Searcher's
conventions), plus searches per question, overall and by question `type`.

`evaluate_model` runs each question through the real loop (greedy); `score_rows` scores rows that
already carry a prediction.
"""

from __future__ import annotations

import asyncio
import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from agent.engine import SamplingParams
from agent.events import Finished
from agent.loop import AgentLoop, Limits, RunParams


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _golds(answer: str | list[str]) -> list[str]:
    return [answer] if isinstance(answer, str) else [str(a) for a in answer]


def exact_match(pred: str, answer: str | list[str]) -> float:
    return float(any(normalize_answer(pred) == normalize_answer(g) for g in _golds(answer)))


def cover_exact_match(pred: str, answer: str | list[str]) -> float:
    """The normalized gold answer appears inside the normalized prediction."""
    p = f" {normalize_answer(pred)} "
    return float(any(f" {normalize_answer(g)} " in p for g in _golds(answer)))


def f1_score(pred: str, answer: str | list[str]) -> float:
    return max(_f1(pred, g) for g in _golds(answer))


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred), normalize_answer(gold)
    special = {"yes", "no", "noanswer"}
    if (p in special or g in special) and p != g:
        return 0.0
    common = Counter(p.split()) & Counter(g.split())
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p.split()), same / len(g.split())
    return 2 * precision * recall / (precision + recall)


def score_rows(rows: Iterable[dict]) -> dict:
    """Aggregate rows with `pred`, `answer`, `searches` and optional `type`."""
    totals: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        scored = {
            "em": exact_match(row["pred"], row["answer"]),
            "cover_em": cover_exact_match(row["pred"], row["answer"]),
            "f1": f1_score(row["pred"], row["answer"]),
            "searches": float(row.get("searches", 0)),
        }
        totals["all"].append(scored)
        if "type" in row:
            totals[str(row["type"])].append(scored)

    def mean(items: list[dict]) -> dict:
        n = len(items)
        avg = {
            k: round(sum(i[k] for i in items) / n, 4) if n else 0.0
            for k in ("em", "cover_em", "f1")
        }
        avg["avg_searches"] = round(sum(i["searches"] for i in items) / n, 4) if n else 0.0
        return {"n": n, **avg}

    report = mean(totals.pop("all", []))
    if totals:
        report["by_type"] = {t: mean(items) for t, items in sorted(totals.items())}
    return report


async def predict(loop: AgentLoop, question: str) -> tuple[str, int]:
    finished = None
    async for event in loop.run(loop.prompt_ids(question), RunParams(SamplingParams())):
        if isinstance(event, Finished):
            finished = event
    assert finished is not None
    return finished.trajectory.answer or "", finished.usage.searches


async def evaluate_loop(loop: AgentLoop, rows: list[dict]) -> list[dict]:
    out = []
    for row in tqdm(rows, desc="eval", unit="q"):
        pred, searches = await predict(loop, row["question"])
        out.append({**row, "pred": pred, "searches": searches})
    return out


def evaluate_model(model_dir: Path, index_dir: Path, rows: list[dict], top_k: int = 3) -> dict:
    from agent.checkpoint import load_format, load_tokenizer
    from agent.hf_engine import TransformersEngine
    from retrieval.index import load_index

    fmt = load_format(model_dir)
    tokenizer = load_tokenizer(model_dir, fmt)
    engine = TransformersEngine(model_dir, tokenizer)
    loop = AgentLoop(engine, load_index(index_dir), fmt, Limits(top_k=top_k))
    return score_rows(asyncio.run(evaluate_loop(loop, rows)))
