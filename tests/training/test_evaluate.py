"""Answer scoring: R1-Searcher's normalization and EM / cover-EM / F1, per-type aggregation, and
R1-Searcher's published predictions scored to the paper's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.tags import get_format
from service.cli import main
from training.evaluate import (
    cover_exact_match,
    exact_match,
    f1_score,
    normalize_answer,
    prediction_row,
    score_rows,
)

R1_RESULTS = Path("/work/shared/data/r1-searcher/eval_results")

# file: (ACC_R, ACC_L) in percent, R1-Searcher's table (arXiv 2503.05592; the repo's
# assets/benchmarks.jpg), then (EM, F1) in percent as R1-Searcher's own
# evaluation/metric_calc_rule.py prints them for these files (the paper reports no EM or F1).
R1_PAPER = {
    "hotpotqa_qwen": ((65.4, 75.0), (58.0, 71.9)),
    "hotpotqa_llama": ((64.8, 74.6), (58.4, 70.6)),
    "2wiki_qwen": ((63.6, 65.0), (55.4, 63.7)),
    "bamboogle_qwen": ((52.8, 54.4), (45.6, 57.7)),
    "bamboogle_llama": ((50.4, 54.4), (44.0, 57.1)),
}


def test_normalization_ignores_case_punctuation_articles_and_spaces():
    """Guards against 'The  Velmora.' scoring differently from 'velmora'."""
    assert normalize_answer("  The  Velmora. ") == "velmora"
    assert exact_match("the Velmora!", "Velmora") == 1.0


def test_punctuation_becomes_a_space_not_nothing():
    """Guards against HotpotQA's deletion of punctuation creeping back: R1-Searcher splits
    'Spider-Man' into two words, so 'Spiderman' no longer equals it and 'spider man' does."""
    assert normalize_answer("Spider-Man") == "spider man"
    assert exact_match("Spiderman", "Spider-Man") == 0.0
    assert exact_match("spider man", "Spider-Man") == 1.0
    assert f1_score("Spider Man", "Spider-Man") == 1.0
    # The underscore, backtick, curly single quotes and acute accent are punctuation too ...
    assert normalize_answer("New_York `O’Neill´ ‘x’") == "new york o neill x"
    # ... but curly double quotes are not in R1-Searcher's set.
    assert normalize_answer("“Velmora”") == "“velmora”"


def test_articles_are_dropped_as_whole_words_after_punctuation():
    """Guards against dropping 'the' inside a word, and against removing articles before
    punctuation is spaced out (R1-Searcher's order: 'A-ha' loses its 'a')."""
    assert normalize_answer("The Lord of the Rings") == "lord of rings"
    assert normalize_answer("Theater an Anthem") == "theater anthem"
    assert normalize_answer("A-ha") == "ha"


def test_true_and_false_read_as_yes_and_no():
    """Guards against a boolean gold (str() gives 'True') never matching a 'yes' prediction."""
    assert exact_match("yes", "True") == 1.0
    assert cover_exact_match("no", ["False"]) == 1.0
    assert f1_score("True", "no") == 0.0


def test_cover_em_matches_whole_words_only():
    """Guards against cover-EM crediting a gold answer that is only a substring of a word."""
    assert cover_exact_match("born in Velmora in 1874", "Velmora") == 1.0
    assert cover_exact_match("Velmorabad", "Velmora") == 0.0


def test_cover_em_asks_for_every_gold_word_in_any_order():
    """Guards against cover-EM as a contiguous-phrase test (R1-Searcher's ACC_R is not one) and
    against crediting a prediction that has only some of the gold's words."""
    assert cover_exact_match("Parker, Peter", "Peter Parker") == 1.0
    assert cover_exact_match("Peter Benjamin Parker", "Peter Parker") == 1.0
    assert cover_exact_match("Peter", "Peter Parker") == 0.0
    assert cover_exact_match("Peter", ["Peter Parker", "Peter"]) == 1.0
    # A gold that normalizes to nothing is covered only by a prediction that does too.
    assert cover_exact_match("anything", "The") == 0.0
    assert cover_exact_match("a", "The") == 1.0


def test_f1_partial_and_yes_no():
    """Guards against yes/no answers getting partial credit (HotpotQA's rule)."""
    assert f1_score("Gal Borin", "Gal Borin Jr") == pytest.approx(0.8)
    assert f1_score("yes", "no") == 0.0
    assert f1_score("anything", ["nope", "anything"]) == 1.0


def test_score_rows_reports_fractions_and_types():
    """Guards against a report that mixes types or counts searches wrongly."""
    rows = [  # fmt: skip
        {"pred": "Velmora", "answer": "Velmora", "type": "1hop", "searches": 1},
        {"pred": "Drell", "answer": "Ostland", "type": "2hop", "searches": 2},
        {"pred": "Ostland", "answer": "Ostland", "type": "2hop", "searches": 3},
    ]
    report = score_rows(rows)
    assert report["n"] == 3 and report["em"] == pytest.approx(2 / 3, abs=1e-4)
    assert report["avg_searches"] == pytest.approx(2.0)
    assert report["by_type"]["1hop"] == {
        "n": 1, "em": 1.0, "cover_em": 1.0, "f1": 1.0, "avg_searches": 1.0,
    }  # fmt: skip
    assert report["by_type"]["2hop"]["em"] == 0.5


def test_prediction_rows_count_searches_from_the_trace_and_read_the_judge():
    """Guards against counting a query tag inside retrieved documents as a search, and against
    an LLM-judge column averaged over only some of the rows."""
    trace = (
        "<|begin_of_query|> Gal Borin<|end_of_query|>\n\n<|begin_of_documents|>\n(1)a "
        "<|begin_of_query|> b<|end_of_query|>\n<|end_of_documents|>\n\n <answer> Velmora </answer>"
    )
    line = {
        "question": "q",
        "answer": ["Velmora"],
        "pred_ans": " Velmora ",
        "gen_text_store": trace,
    }
    judged = prediction_row(line | {"gpt4o_output": "True"}, get_format("r1-searcher"))
    assert judged == {"pred": " Velmora ", "answer": ["Velmora"], "searches": 1, "judge": True}
    wrong = prediction_row(line | {"gpt4o_output": "False"}, get_format("r1-searcher"))
    assert score_rows([judged, wrong])["llm_judge"] == 0.5
    unjudged = prediction_row(line, get_format("r1-searcher"))
    assert "llm_judge" not in score_rows([judged, unjudged])
    with pytest.raises(ValueError, match="missing field"):
        prediction_row({"question": "q"}, get_format("r1-searcher"))


@pytest.mark.parametrize("name", sorted(R1_PAPER))
def test_r1_searcher_predictions_score_the_papers_numbers(name, capsys):
    """Guards against our scorer drifting from R1-Searcher's: `searchagent eval --predictions` on
    its published predictions must give the paper's ACC_R (cover-EM) and ACC_L (LLM judge), and
    the EM and F1 its own scorer prints, each to one decimal in percent."""
    path = R1_RESULTS / f"{name}.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    main(["eval", "--predictions", str(path), "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    percent = {k: round(100 * report[k], 1) for k in ("cover_em", "llm_judge", "em", "f1")}
    (acc_r, acc_l), (em, f1) = R1_PAPER[name]
    assert percent == {"cover_em": acc_r, "llm_judge": acc_l, "em": em, "f1": f1}


def test_evaluation_modes_search_as_their_names_say(tmp_path):
    """Guards against a baseline that is not what RESULTS.md calls it: no-retrieval must never
    reach the retriever, naive RAG must retrieve once with the question before the model
    writes, and the agent mode must search as the policy decides."""
    import asyncio

    from agent.loop import AgentLoop
    from agent.scripted import ScriptedEngine
    from agent.tags import DEFAULT
    from agent.tokenizer import Tokenizer
    from retrieval.bm25 import BM25Retriever
    from retrieval.types import Passage
    from training.evaluate import evaluate_loop, score_rows
    from training.tokenizer import train_tokenizer

    passages = [Passage("p1", "Gal Borin", "Gal Borin was born in Velmora.")]
    tok = train_tokenizer([" Gal Borin was born in Velmora. Where birthplace"] * 30, 300)
    tok.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer.from_dir(tmp_path, eos_token=DEFAULT.eos, bos_token=DEFAULT.bos)

    class Counting(BM25Retriever):
        queries: list[str] = []

        async def search(self, queries, k):
            type(self).queries += queries
            return await super().search(queries, k)

    retriever = Counting.build(passages)
    search = "<search> Gal Borin birthplace</search>"
    answer = "<answer> Velmora</answer>"
    row = {"question": "Where was Gal Borin born?", "answer": "Velmora", "type": "1hop"}

    def evaluate(mode: str, *texts: str) -> tuple[dict, list[str]]:
        Counting.queries = []
        engine = ScriptedEngine(tokenizer, [tokenizer.encode(t) for t in texts])
        loop = AgentLoop(engine, retriever, DEFAULT)
        return score_rows(asyncio.run(evaluate_loop(loop, [row], mode=mode))), Counting.queries

    report, asked = evaluate("agent", search, answer)
    assert asked == ["Gal Borin birthplace"] and report["avg_searches"] == 1 and report["em"] == 1
    report, asked = evaluate("no-retrieval", search, answer)
    assert asked == [] and report["avg_searches"] == 0
    report, asked = evaluate("naive-rag", answer)
    assert asked == [row["question"]] and report["avg_searches"] == 1 and report["em"] == 1
    assert report["avg_tokens"] == len(tokenizer.encode(answer))  # the forced search is not
    with pytest.raises(ValueError, match="unknown evaluation mode"):
        evaluate("oracle", answer)


def test_famous_questions_form_their_own_group():
    """Guards against the famous-entity set being empty or mixing in other questions."""
    from training.evaluate import mark_famous

    rows = [  # fmt: skip
        {
            "pred": "Velmora",
            "answer": "Velmora",
            "searches": 0,
            "type": "1hop",
            "entities": ["Star"],
        },
        {
            "pred": "Drell",
            "answer": "Ostland",
            "searches": 2,
            "type": "1hop",
            "entities": ["Nobody"],
        },
    ]
    report = score_rows(mark_famous(rows, {"Star"}))
    assert report["by_type"]["famous"] == {
        "n": 1, "em": 1.0, "cover_em": 1.0, "f1": 1.0, "avg_searches": 0.0
    }  # fmt: skip
    assert report["by_type"]["1hop"]["n"] == 2
