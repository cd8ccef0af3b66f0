"""`searchagent eval --predictions`: scoring another project's predictions file as a real process,
and one-line errors (exit status 2) for every kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

R1_RESULTS = Path("/work/shared/data/r1-searcher/eval_results")


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "service.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_eval_scores_an_r1_searcher_predictions_file():
    """Guards against mis-scoring R1-Searcher's published HotpotQA/Qwen predictions: cover-EM and
    the LLM-judge column must equal the paper's ACC_R (0.654) and ACC_L (0.750), EM and F1 what
    R1-Searcher's own scorer gives, and searches the 1055 queries in the traces."""
    path = R1_RESULTS / "hotpotqa_qwen.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    r = _cli("eval", "--predictions", str(path), "--format", "r1-searcher", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report == {
        "n": 500, "em": 0.58, "cover_em": 0.654, "f1": 0.7187, "llm_judge": 0.75,
        "avg_searches": round(1055 / 500, 4),
    }  # fmt: skip

    table = _cli("eval", "--predictions", str(path)).stdout.splitlines()
    assert table[0].split() == ["n", "em", "cover_em", "f1", "llm_judge", "avg_searches"]
    assert table[1].split() == ["all", "500", "0.5800", "0.6540", "0.7187", "0.7500", "2.1100"]


GOOD = {"question": "q?", "answer": "Velmora", "pred_ans": " Velmora ", "gen_text_store": "x"}


@pytest.mark.parametrize(
    ("lines", "extra", "message"),
    [
        (None, [], "cannot read"),
        ([json.dumps(GOOD), "{not json"], [], ":2: invalid JSON"),
        ([json.dumps({k: v for k, v in GOOD.items() if k != "pred_ans"})], [], "missing field"),
        ([json.dumps(GOOD | {"answer": 7})], [], "'answer' must be a string"),
        (["[1, 2]"], [], "not a JSON object"),
        ([""], [], "no predictions"),
        ([json.dumps(GOOD)], ["--format", "nope"], "unknown tag format 'nope'"),
        ([json.dumps(GOOD)], ["--model", "m"], "drop --model"),
    ],
    ids=["missing", "not-json", "no-field", "bad-answer", "not-object", "empty", "format", "mix"],
)
def test_eval_predictions_bad_input_is_one_line_and_exit_2(tmp_path, lines, extra, message):
    """Guards against a traceback (or a misleading score) on a broken predictions file."""
    path = tmp_path / "preds.jsonl"
    if lines is not None:
        path.write_text("\n".join(lines) + "\n")
    r = _cli("eval", "--predictions", str(path), *extra, "--json")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.startswith("searchagent: ") and r.stderr.strip().count("\n") == 0
    assert message in r.stderr


def test_eval_without_model_or_predictions_says_what_it_needs():
    """Guards against argparse's two-line usage dump, or a traceback, when eval gets no input."""
    r = _cli("eval", "--json")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "searchagent: eval needs --model, --index, --data (or --predictions FILE, which needs "
        "no model)"
    )


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("model", "--model: "),
        ("index", "--index: cannot load index"),
        ("data", ":1: a row needs a string 'question'"),
    ],
)
def test_eval_of_a_model_refuses_bad_input_in_one_line(tmp_path, demo_artifacts, bad, message):
    """Guards against a traceback from `eval --model` when the checkpoint or index directory is
    wrong, or a question row lacks its fields (a KeyError after the model had loaded)."""
    row = {"q": "Where?"} if bad == "data" else {"question": "Where?", "answer": "There"}
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps(row) + "\n")
    args = {"model": demo_artifacts / "sft", "index": demo_artifacts / "index", "data": data}
    if bad != "data":
        args[bad] = tmp_path / "nothing"
    r = _cli("eval", *(f"--{k}={v}" for k, v in args.items()), "--json")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.startswith("searchagent: ") and r.stderr.strip().count("\n") == 0
    assert message in r.stderr


@pytest.mark.parametrize(
    ("row", "extra", "message"),
    [
        ({"q": "Where?"}, [], ":1: a row needs a string 'question'"),
        ({"question": "Where?", "answer": "There", "type": "1hop"}, ["--types", "4hop"],
         "--types: "),
    ],
)  # fmt: skip
def test_train_rl_refuses_bad_questions_in_one_line(tmp_path, demo_artifacts, row, extra, message):
    """Guards against `train rl` failing with a KeyError traceback once the trainer is built,
    on a data file whose rows lack their fields or hold none of the types asked for."""
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps(row) + "\n")
    r = _cli(
        "train", "rl", "--init", str(demo_artifacts / "sft"), "--out", str(tmp_path / "o"),
        "--index", str(demo_artifacts / "index"), "--data", str(data), *extra,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("searchagent: ") and r.stderr.strip().count("\n") == 0
    assert message in r.stderr and not (tmp_path / "o").exists()
