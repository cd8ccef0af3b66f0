"""End to end: `searchagent serve` as a real process on a free port, the official `openai`
client against it (streaming and not), and `searchagent eval` printing its JSON report."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest


@pytest.fixture(scope="module")
def served(tiny_checkpoint, small_index, serve_cli):
    args = ["serve", "--model", str(tiny_checkpoint), "--index", str(small_index),
            "--served-model-name", "demo"]  # fmt: skip
    with serve_cli(args) as url:
        yield url


def test_openai_client_streams_and_completes_through_the_agent(served, known_question):
    """Guards against the served process being unusable from the official client: a question
    gets an answer both ways, and the trace shows what was searched and retrieved."""
    question = known_question["question"]
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": question}]

    r = client.chat.completions.create(model="demo", messages=messages)
    message = r.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert "<search>" in reasoning and "<documents>" in reasoning
    assert r.model_extra["search_trace"][0]["passages"]
    assert message.content

    content, reasoning_parts = [], []
    for chunk in client.chat.completions.create(model="demo", messages=messages, stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            content.append(delta.content or "")
            reasoning_parts.append((delta.model_extra or {}).get("reasoning_content") or "")
    assert "".join(content) == message.content
    assert "".join(reasoning_parts) == reasoning


def test_serve_rejects_a_missing_checkpoint_with_one_line(tmp_path, small_index):
    """Guards against a traceback when the model path is wrong."""
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", str(tmp_path / "none"),
           "--index", str(small_index)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "not a checkpoint directory" in r.stderr


def test_eval_cli_prints_one_json_report(tiny_checkpoint, small_index, small_world):
    """Guards against an eval report that scripts cannot parse: the last line is one JSON
    object with the metrics as fractions, broken down by question type."""
    cmd = [
        sys.executable, "-m", "service.cli", "eval", "--model", str(tiny_checkpoint),
        "--index", str(small_index), "--data", str(small_world / "test.jsonl"),
        "--limit", "6", "--json",
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["n"] == 6
    for key in ("em", "cover_em", "f1"):
        assert 0.0 <= report[key] <= 1.0
    assert report["avg_searches"] >= 0
    assert sum(t["n"] for t in report["by_type"].values()) == 6


def test_serve_rejects_a_corrupt_index_with_one_line(tmp_path, tiny_checkpoint, small_index):
    """Guards against a traceback (or a server that starts and fails later) on a broken index."""
    import shutil

    broken = tmp_path / "index"
    shutil.copytree(small_index, broken)
    (broken / "index.json").write_text("{not json")
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", str(tiny_checkpoint),
           "--index", str(broken)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("searchagent: cannot start:")
