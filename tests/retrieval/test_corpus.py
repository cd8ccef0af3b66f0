"""retrieval/corpus.py: our jsonl format, Search-R1's `contents` format, and bad lines."""

from __future__ import annotations

import json

import pytest

from retrieval.corpus import iter_corpus, read_corpus


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_our_format_with_optional_title_and_blank_lines(tmp_path):
    """Guards against: dropping passages without a title, or choking on blank lines."""
    path = write_lines(
        tmp_path / "c.jsonl",
        [
            json.dumps({"id": "p1", "title": "Ada Lind", "text": "Ada Lind is a painter."}),
            "",
            json.dumps({"id": 7, "text": "No title here."}),
        ],
    )
    assert read_corpus(path) == [
        {"id": "p1", "title": "Ada Lind", "text": "Ada Lind is a painter."},
        {"id": "7", "title": "", "text": "No title here."},
    ]


def test_search_r1_contents_format(tmp_path):
    """Guards against: keeping Search-R1's quotes in titles, or losing text after the first line."""
    path = write_lines(
        tmp_path / "wiki.jsonl",
        [
            json.dumps({"id": "0", "contents": '"Ada Lind"\nAda Lind paints.\nShe is in Norvik.'}),
            json.dumps({"id": 1, "contents": "Unquoted Title\nBody."}),
            json.dumps({"id": "2", "contents": '"Only a title"'}),
        ],
    )
    assert read_corpus(path) == [
        {"id": "0", "title": "Ada Lind", "text": "Ada Lind paints.\nShe is in Norvik."},
        {"id": "1", "title": "Unquoted Title", "text": "Body."},
        {"id": "2", "title": "Only a title", "text": ""},
    ]


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("{not json", "not valid JSON"),
        ('["a", "list"]', "expected a JSON object"),
        ('{"title": "t", "text": "no id"}', "'id'"),
        ('{"id": "x", "title": "t"}', "needs 'text'"),
        ('{"id": "x", "text": 3}', "must be strings"),
        ('{"id": "x", "contents": null}', "'contents' must be a string"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, bad_line, reason):
    """Guards against: a KeyError/JSONDecodeError from deep inside a 21M-line file with no line
    number, or silently skipping a broken passage."""
    good = json.dumps({"id": "ok", "title": "t", "text": "x"})
    path = write_lines(tmp_path / "c.jsonl", [good, good.replace("ok", "ok2"), bad_line])
    with pytest.raises(ValueError, match=reason) as info:
        read_corpus(path)
    assert str(info.value).startswith(f"{path}:3: ")


def test_iter_corpus_streams(tmp_path):
    """Guards against: reading the whole file before the first passage comes out."""
    good = json.dumps({"id": "ok", "text": "x"})
    path = write_lines(tmp_path / "c.jsonl", [good, "{broken"])
    passages = iter_corpus(path)
    assert next(passages)["id"] == "ok"  # the bad line 2 has not been parsed yet
    with pytest.raises(ValueError, match=":2: "):
        next(passages)
