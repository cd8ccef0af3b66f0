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
    """The checkpoint's tokenizer, ending generation on the format's EOS and on every EOS id the
    checkpoint names (`eos_token_id` in generation_config.json or config.json, as vLLM and
    `generate` stop). A format whose EOS string the vocabulary lacks (a Llama checkpoint named
    with the `search-r1` preset, whose EOS is Qwen's) takes the checkpoint's first EOS instead."""
    extra = checkpoint_eos_ids(path)
    return Tokenizer.from_dir(path, eos_token=fmt.eos, bos_token=fmt.bos, extra_eos=extra)


def checkpoint_eos_ids(path: str | Path) -> list[int]:
    """`eos_token_id` (an id or a list) from generation_config.json, then config.json."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        file = Path(path) / name
        if not file.is_file():
            continue
        try:
            value = json.loads(file.read_text()).get("eos_token_id")
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"{file} is not a JSON object: {exc}") from exc
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and not isinstance(i, bool) and i not in ids:
                ids.append(i)
    return ids
