"""Output directories written whole or not at all: indexes, worlds, checkpoints.

`staged_dir(out, marker, what)` hands out a scratch directory inside `out` (`out/.partial`) to
write into. Only when the block finishes do its files take the place of `out`'s earlier ones, so
a failed or interrupted build leaves `out` as it was — an earlier index still loads, an earlier
checkpoint keeps its own tokenizer — never a half-written output that a later run would trust.
The scratch lives inside `out`, not beside it, so `out` may be a mount point, a symlink, or sit
in a directory this user cannot write.

The swap removes the old `marker` first and moves the new one in last: between the two `out`
holds no marker, which every loader reads as an unfinished build, so even a crash inside the
swap cannot pass for a complete output. `out` must be new, empty, or an earlier output of the
same kind (it holds `marker`): a directory of something else is refused, never replaced.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCRATCH = ".partial"


def check_out_dir(out: Path, marker: str, what: str) -> None:
    """Raise ValueError unless `out` may receive a new `what` (see the module docstring)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a directory")
    if out.is_dir():
        held = [p for p in out.iterdir() if p.name != SCRATCH]
        if held and not (out / marker).exists():
            raise ValueError(
                f"{out} is not empty and holds no {what} (no {marker}): give a new or empty "
                "directory"
            )


@contextmanager
def staged_dir(out: str | os.PathLike[str], marker: str, what: str) -> Iterator[Path]:
    out = Path(out)
    check_out_dir(out, marker, what)
    scratch = out / SCRATCH
    created = not out.exists()
    shutil.rmtree(scratch, ignore_errors=True)  # an earlier run's, interrupted
    scratch.mkdir(parents=True)
    try:
        yield scratch
        _swap_in(out, scratch, marker)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if created and not any(out.iterdir()):  # a failed first build leaves nothing behind
            out.rmdir()


def _swap_in(out: Path, scratch: Path, marker: str) -> None:
    (out / marker).unlink(missing_ok=True)  # from here until the last move, `out` is unfinished
    for old in out.iterdir():
        if old.name == SCRATCH:
            continue
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    for new in sorted(scratch.iterdir(), key=lambda p: p.name == marker):  # the marker last
        new.rename(out / new.name)


def clear_unfinished(out: Path) -> None:
    """Remove `out` when an interrupted build left only its scratch there (so no marker either).
    Anything more is not ours to delete, even in a directory the caller names (the demo's, the
    pipeline's): the staged build that follows refuses it with a one-line error instead."""
    if out.is_dir() and {p.name for p in out.iterdir()} <= {SCRATCH}:
        shutil.rmtree(out)
