"""Per-file sizes and sha256 digests of an index directory, recorded in its manifest.

`index build` records every file it wrote (paths relative to the index directory, "/"-separated,
the manifest itself excepted) as `{"size": bytes, "sha256": hex}`. Loading compares sizes only
(a stat per file: a truncated copy or a file replaced by another build is caught before FAISS or
bm25s reads it); `searchagent index verify` reads every byte and compares the digests, which also
catches a flipped bit. Indexes built before the digests were recorded have none: loading skips
the check, and verify says there is nothing to verify.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FileCheck:
    """One recorded file as found on disk: `ok`, else `problem` says how it differs."""

    name: str
    size: int
    ok: bool
    problem: str = ""


def record_files(directory: Path, exclude: str) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every file under `directory` but `exclude`."""
    records = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if name != exclude:
            records[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return records


def valid_records(records: object) -> bool:
    """Whether a manifest's `files` value has the shape `record_files` writes."""
    return isinstance(records, dict) and all(
        isinstance(name, str)
        and not name.startswith("/")
        and ".." not in name.split("/")  # nothing outside the index directory
        and isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
        for name, entry in records.items()
    )


def size_mismatch(directory: Path, records: dict[str, dict[str, Any]]) -> str | None:
    """The first recorded file present with another size, described in a phrase; else None.
    Missing files are left to the loader, which names every one of them."""
    for name, entry in records.items():
        try:
            size = (directory / name).stat().st_size
        except FileNotFoundError:
            continue
        if size != entry["size"]:
            return f"{name} is {size} bytes, the manifest recorded {entry['size']}"
    return None


def verify_files(directory: Path, records: dict[str, dict[str, Any]]) -> list[FileCheck]:
    """Every recorded file checked by size, then by full sha256."""
    checks = []
    for name, entry in records.items():
        path = directory / name
        if not path.is_file():
            checks.append(FileCheck(name, entry["size"], False, "missing"))
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problem = f"{size} bytes, recorded {entry['size']}"
            checks.append(FileCheck(name, size, False, problem))
        elif (digest := file_sha256(path)) != entry["sha256"]:
            problem = f"sha256 {digest[:12]}, recorded {entry['sha256'][:12]}"
            checks.append(FileCheck(name, size, False, problem))
        else:
            checks.append(FileCheck(name, size, True))
    return checks


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes (`sha256sum` prints the same), read in chunks."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
