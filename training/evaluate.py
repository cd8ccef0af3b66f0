"""Evaluation: EM, cover-EM and F1 as R1-Searcher scores them, an LLM judge's verdicts where a
predictions file carries them, and searches per question, overall and by question `type`.

`evaluate_model` runs each question through the real loop (greedy); `score_rows` scores rows that
already carry a prediction; `prediction_row` reads one line of another project's predictions file
(R1-Searcher's jsonl) into such a row, with its searches counted from the trace.

The metrics are R1-Searcher's (evaluation/metric_calc_rule.py), so our numbers are comparable with
the paper's: on its published predictions `cover_em` is its ACC_R and `llm_judge` its ACC_L. Their
scorer is HotpotQA's official one with these changes, which are the definitions here:
  - normalization turns punctuation (ASCII, plus ‘ ’ ´) into a space instead of deleting it, so
    "Spider-Man" is the two words "spider man", and reads the strings "True"/"False" as yes/no;
  - cover-EM (their `cover_em_1`, reported as ACC_R) asks that every word of the gold answer occur
    among the prediction's words, in any order and not necessarily adjacent;
  - EM and F1 are HotpotQA's on that normalization, yes/no/noanswer included (F1 gives those no
    partial credit). Each metric takes the best over the gold answers.
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
from agent.tags import TagFormat
from agent.trace import parse_trace

# What each line of an R1-Searcher predictions file (its data/eval_results/*.jsonl) must carry.
PREDICTION_FIELDS = ("question", "answer", "pred_ans", "gen_text_store")

# string.punctuation already holds "_" and "`"; R1-Searcher adds the curly single quotes and "´".
# (Curly double quotes are not in their set, so they stay part of a word.)
_PUNCTUATION_TO_SPACE = str.maketrans(dict.fromkeys(string.punctuation + "‘’´", " "))
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Python's str() of a boolean gold or verdict; matched on the raw string, before normalizing.
_BOOLS = {"True": "yes", "False": "no"}


def normalize_answer(text: str) -> str:
    """Lower case, punctuation to spaces, a/an/the dropped, single spaces ("True" reads as yes)."""
    text = _BOOLS.get(text, text).lower().translate(_PUNCTUATION_TO_SPACE)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(answer: str | list[str]) -> list[str]:
    return [answer] if isinstance(answer, str) else [str(a) for a in answer]


def _words(text: str) -> set[str]:
    # split(" "), not split(): an answer that normalizes to "" is the one word "", so an empty gold
    # is covered only by an empty prediction, as in R1-Searcher (with split(), anything covers it).
    return set(normalize_answer(text).split(" "))


def exact_match(pred: str, answer: str | list[str]) -> float:
    return float(any(normalize_answer(pred) == normalize_answer(g) for g in _golds(answer)))


def cover_exact_match(pred: str, answer: str | list[str]) -> float:
    """Every word of some normalized gold answer is among the normalized prediction's words, in
    any order (R1-Searcher's ACC_R): "Parker, Peter" covers "Peter Parker"."""
    words = _words(pred)
    return float(any(_words(g) <= words for g in _golds(answer)))


def f1_score(pred: str, answer: str | list[str]) -> float:
    return max(_f1(pred, g) for g in _golds(answer))


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred), normalize_answer(gold)
    # HotpotQA's rule, kept by R1-Searcher: a yes/no/noanswer answer gets no partial credit.
    special = {"yes", "no", "noanswer"}
    if (p in special or g in special) and p != g:
        return 0.0
    common = Counter(p.split()) & Counter(g.split())
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p.split()), same / len(g.split())
    return 2 * precision * recall / (precision + recall)


def prediction_row(obj: object, fmt: TagFormat) -> dict:
    """One line of an R1-Searcher-style predictions file as a `score_rows` row: the prediction is
    `pred_ans`, the searches are the queries `parse_trace` finds in `gen_text_store`, and
    `gpt4o_output` (their GPT-4o-mini judge's reply, "True" or "False"), if present, is the
    LLM-judge verdict. Raises ValueError saying what is wrong with the line."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    missing = [key for key in PREDICTION_FIELDS if key not in obj]
    if missing:
        raise ValueError(f"missing field(s): {', '.join(missing)}")
    answer = obj["answer"]
    if not isinstance(answer, str) and not (
        isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer)
    ):
        raise ValueError("'answer' must be a string or a non-empty list of strings")
    for key in ("pred_ans", "gen_text_store"):
        if not isinstance(obj[key], str):
            raise ValueError(f"'{key}' must be a string")
    row = {
        "pred": obj["pred_ans"],
        "answer": answer,
        "searches": len(parse_trace(obj["gen_text_store"], fmt).queries),
    }
    if "gpt4o_output" in obj:
        row["judge"] = str(obj["gpt4o_output"]).strip().lower() == "true"
    return row


def score_rows(rows: Iterable[dict]) -> dict:
    """Aggregate rows with `pred`, `answer`, `searches`, optional `type` (and `famous`: a
    "famous" group of its own, beside the types) and optional `judge`
    (an LLM judge's verdict; `llm_judge` is reported when every row of a group has one) and
    optional `tokens` (generated tokens; `avg_tokens` when every row has them)."""
    totals: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        scored = {
            "em": exact_match(row["pred"], row["answer"]),
            "cover_em": cover_exact_match(row["pred"], row["answer"]),
            "f1": f1_score(row["pred"], row["answer"]),
            "searches": float(row.get("searches", 0)),
        }
        if "judge" in row:
            scored["judge"] = float(row["judge"])
        if "tokens" in row:
            scored["tokens"] = float(row["tokens"])
        totals["all"].append(scored)
        if "type" in row:
            totals[str(row["type"])].append(scored)
        if row.get("famous"):
            totals["famous"].append(scored)

    def mean(items: list[dict]) -> dict:
        n = len(items)
        avg = {
            k: round(sum(i[k] for i in items) / n, 4) if n else 0.0
            for k in ("em", "cover_em", "f1")
        }
        if n and all("judge" in i for i in items):
            avg["llm_judge"] = round(sum(i["judge"] for i in items) / n, 4)
        avg["avg_searches"] = round(sum(i["searches"] for i in items) / n, 4) if n else 0.0
        if n and all("tokens" in i for i in items):
            avg["avg_tokens"] = round(sum(i["tokens"] for i in items) / n, 2)
        return {"n": n, **avg}

    report = mean(totals.pop("all", []))
    if totals:
        report["by_type"] = {t: mean(items) for t, items in sorted(totals.items())}
    return report


# How a model is run on a question (`evaluate_loop`), the baselines of RESULTS.md among them:
#   agent         the policy searches as it decides (the served behaviour);
#   no-retrieval  no search is ever carried out: the first search the model writes gets the loop's
#                 budget notice instead of documents, and the model answers from what it knows;
#   naive-rag     one retrieval with the question itself, injected before the model writes
#                 anything (as if it had searched for the question), then no more searches.
MODES = ("agent", "no-retrieval", "naive-rag")


def run_params(mode: str, question: str) -> RunParams:
    """Greedy `RunParams` for one question in `mode`."""
    if mode == "agent":
        return RunParams(SamplingParams())
    if mode == "no-retrieval":
        return RunParams(SamplingParams(), max_searches=0)
    if mode == "naive-rag":
        return RunParams(SamplingParams(), max_searches=1, first_search=question)
    raise ValueError(f"unknown evaluation mode {mode!r}; known: {list(MODES)}")


async def predict(loop: AgentLoop, question: str, mode: str = "agent") -> tuple[str, int, int]:
    """(answer, searches, generated tokens) of one greedy run."""
    finished = None
    params = run_params(mode, question)
    async for event in loop.run(loop.prompt_ids(question), params):
        if isinstance(event, Finished):
            finished = event
    assert finished is not None
    usage = finished.usage
    return finished.trajectory.answer or "", usage.searches, usage.completion_tokens


async def evaluate_loop(
    loop: AgentLoop, rows: list[dict], concurrency: int = 16, mode: str = "agent"
) -> list[dict]:
    """Every row through the loop, `concurrency` at a time (the engine batches them); in order."""
    run_params(mode, "")  # an unknown mode fails before any work
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(rows), desc=f"eval {mode}", unit="q")

    async def one(row: dict) -> dict:
        async with gate:
            pred, searches, tokens = await predict(loop, row["question"], mode)
        bar.update(1)
        return {**row, "pred": pred, "searches": searches, "tokens": tokens}

    out = await asyncio.gather(*(one(row) for row in rows))
    bar.close()
    return list(out)


def evaluate_model(
    model_dir: Path,
    index_dir: Path,
    rows: list[dict],
    top_k: int = 3,
    mode: str = "agent",
    tag_format: str | None = None,
    max_context: int = Limits.max_context,
    max_tokens: int = Limits.max_tokens,
) -> dict:
    """Score `rows` through the loop; `tag_format` names a preset instead of the checkpoint's
    agent.json (a published checkpoint has none). `max_context` (prompt + generated + injected
    tokens) and `max_tokens` (sampled) bound each run: a real-scale model's traces with five
    passages per search need more than the defaults, or they end cut, unanswered."""
    from agent.checkpoint import load_format, load_tokenizer
    from agent.hf_engine import TransformersEngine
    from retrieval.index import load_index

    retriever = load_index(index_dir)  # first: a bad index fails before the model loads
    fmt = load_format(model_dir, tag_format)
    tokenizer = load_tokenizer(model_dir, fmt)
    engine = TransformersEngine(model_dir, tokenizer)
    # as the server does: no run may outgrow the model's context (past it the engine raises)
    limits = Limits(
        top_k=top_k, max_context=min(max_context, engine.max_context), max_tokens=max_tokens
    )
    loop = AgentLoop(engine, retriever, fmt, limits)
    return score_rows(asyncio.run(evaluate_loop(loop, rows, mode=mode)))


def famous_names(world_json: Path) -> set[str]:
    """Names of the world's famous entities (mentioned in many passages: worth memorizing)."""
    import json

    entities = json.loads(Path(world_json).read_text(encoding="utf-8"))["entities"]
    return {e["name"] for e in entities if e.get("famous")}


def mark_famous(rows: list[dict], famous: set[str]) -> list[dict]:
    """The rows with `famous` set: whether the question is about a famous entity (its first)."""
    return [{**row, "famous": row["entities"][0] in famous} for row in rows]
