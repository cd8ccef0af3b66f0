"""Corpus files: jsonl, one passage per line, read into `{"id", "title", "text"}` dicts.

Two line formats are accepted, so published corpora work unchanged:

- ours:      `{"id": "p1", "title": "Ada Lind", "text": "Ada Lind is a painter."}` (title optional)
- Search-R1: `{"id": "0", "contents": "\"Ada Lind\"\nAda Lind is a painter."}` — the first
  line of `contents` is the title, usually in double quotes (FlashRAG / wiki-18 convention).

`iter_corpus` streams (a 21M-passage Wikipedia dump never has to be a list); `read_corpus` is the
list form for small corpora and tests. A bad line fails with `ValueError("file:line: reason")`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from os import PathLike
from pathlib import Path
from typing import Any


def read_corpus(path: str | PathLike[str]) -> list[dict[str, str]]:
    """All passages of a jsonl corpus file, in file order."""
    return list(iter_corpus(path))


def iter_corpus(path: str | PathLike[str]) -> Iterator[dict[str, str]]:
    """Yield `{"id", "title", "text"}` per non-blank line; `ValueError` names file and line."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield _parse_line(raw)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None


def _parse_line(raw: bytes) -> dict[str, str]:
    try:
        obj = json.loads(raw)  # json.loads decodes utf-8 bytes itself
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    pid = obj.get("id")
    if isinstance(pid, bool) or not isinstance(pid, str | int) or pid == "":
        raise ValueError("missing or invalid 'id' (a non-empty string or an integer)")
    if "text" in obj:
        title, text = obj.get("title", ""), obj["text"]
    elif "contents" in obj:
        title, text = split_contents(_require_str(obj, "contents"))
    else:
        raise ValueError("needs 'text' (with optional 'title') or Search-R1's 'contents'")
    if not isinstance(title, str) or not isinstance(text, str):
        raise ValueError("'title' and 'text' must be strings")
    return {"id": str(pid), "title": title, "text": text}


def split_contents(contents: str) -> tuple[str, str]:
    """`"Title"\\ntext` -> (Title, text); the same split FlashRAG and Search-R1 use."""
    first, _, rest = contents.partition("\n")
    first = first.strip()
    if len(first) >= 2 and first[0] == first[-1] == '"':
        first = first[1:-1]
    return first, rest


def _require_str(obj: dict[str, Any], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string")
    return value
