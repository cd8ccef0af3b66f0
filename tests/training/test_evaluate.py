"""Answer scoring: HotpotQA normalization, EM / cover-EM / F1, and per-type aggregation."""

from __future__ import annotations

import pytest

from training.evaluate import cover_exact_match, exact_match, f1_score, normalize_answer, score_rows


def test_normalization_drops_case_punctuation_articles_and_spaces():
    """Guards against 'The  Velmora.' scoring differently from 'velmora'."""
    assert normalize_answer("  The  Velmora. ") == "velmora"
    assert exact_match("the Velmora!", "Velmora") == 1.0


def test_cover_em_matches_whole_words_only():
    """Guards against cover-EM crediting a gold answer that is only a substring of a word."""
    assert cover_exact_match("born in Velmora in 1874", "Velmora") == 1.0
    assert cover_exact_match("Velmorabad", "Velmora") == 0.0


def test_f1_partial_and_yes_no():
    """Guards against yes/no answers getting partial credit (HotpotQA's rule)."""
    assert f1_score("Gal Borin", "Gal Borin Jr") == pytest.approx(0.8)
    assert f1_score("yes", "no") == 0.0
    assert f1_score("anything", ["nope", "anything"]) == 1.0


def test_score_rows_reports_fractions_and_types():
    """Guards against a report that mixes types or counts searches wrongly."""
    rows = [
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
