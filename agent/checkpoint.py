"""A checkpoint directory as the agent sees it: `agent.json` (tag format) and the tokenizer.

`agent.json` = {"format": preset name, "tag_format": {full TagFormat fields}}. The full fields win
over the preset, so a checkpoint keeps working if a preset's defaults change later.
"""

from __future__ import annotations

import json
from pathlib import Path

from agent.tags import PRESETS, TagFormat, get_format
from agent.tokenizer import Tokenizer

AGENT_FILE = "agent.json"


def write_agent_json(path: str | Path, fmt: TagFormat) -> None:
    data = {"format": fmt.name, "tag_format": fmt.to_json()}
    (Path(path) / AGENT_FILE).write_text(json.dumps(data, indent=2) + "\n")


def load_format(path: str | Path, override: str | None = None) -> TagFormat:
    """The checkpoint's tag format; `override` (a preset name) replaces it."""
    if override:
        return get_format(override)
    file = Path(path) / AGENT_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: name the checkpoint's tag format with --format "
            f"({', '.join(PRESETS)})"
        )
    try:
        data = json.loads(file.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"it holds {type(data).__name__}, not a JSON object")
        fields = data.get("tag_format")
        if fields and not isinstance(fields, dict):
            raise ValueError(f"tag_format is {type(fields).__name__}, not a JSON object")
        return TagFormat(**fields) if fields else get_format(data["format"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{file} is not a valid agent.json: {exc}") from exc


def load_tokenizer(path: str | Path, fmt: TagFormat) -> Tokenizer:
    return Tokenizer.from_dir(path, eos_token=fmt.eos, bos_token=fmt.bos)
