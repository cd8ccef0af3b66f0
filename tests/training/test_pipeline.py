"""training/pipeline.py's report: RL logs become one PNG and RESULTS.md's table."""

from __future__ import annotations

import json

from training.pipeline import (
    KEPT_PART,
    RL_STAGES,
    PipelineConfig,
    installs,
    plot_rl,
    results_markdown,
    write_results,
)


def test_rl_logs_become_a_plot_and_a_results_table(tmp_path):
    """Guards against: a stage's log missing from the plot (a silent KeyError skip), a PNG that
    is not one, and a results table that drops a checkpoint or mislabels its numbers."""
    for i, (name, _) in enumerate(RL_STAGES):
        log = [
            {"step": s, "reward": 0.1 * s + i, "rewards/em/mean": 0.5, "rewards/searches/mean": 1.0}
            for s in range(1, 6)
        ]
        (tmp_path / name).mkdir()
        (tmp_path / name / "training.json").write_text(json.dumps({"log": log}))
    png = plot_rl(tmp_path, tmp_path / "plots")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    scores = {
        "sft": {"em": 0.72, "cover_em": 0.73, "f1": 0.722, "avg_searches": 0.98},
        "rl-plus": {"em": 0.7, "cover_em": 0.75, "f1": 0.71, "avg_searches": 0.5},
    }
    timings = {"sft": 600.0, "rl-stage1": 120.0}
    text = results_markdown(PipelineConfig(), scores, png, 900.0, timings)
    assert "| sft | 0.720 | 0.730 | 0.722 | 0.98 |" in text
    assert "| rl-plus | 0.700 | 0.750 | 0.710 | 0.50 |" in text
    assert "Total: 15.0 minutes" in text and "sft 10.0 min" in text and png.as_posix() in text


def test_a_worse_final_checkpoint_is_not_installed():
    """Guards against: `make train` replacing the served model with one that answers worse."""
    row = {"cover_em": 0.0, "f1": 0.0, "avg_searches": 1.0}
    worse = {"rl-plus": {**row, "em": 0.1}, "committed sft": {**row, "em": 0.72}}
    better = {"rl-plus": {**row, "em": 0.75}, "committed sft": {**row, "em": 0.72}}
    assert not installs(worse) and installs(better)
    text = results_markdown(PipelineConfig(), worse, PipelineConfig().plots / "rl.png", 60.0, {})
    assert "was not installed" in text and "| committed sft | 0.720 |" in text


def test_rewriting_results_keeps_the_retro_search_part(tmp_path):
    """Guards against `make train` erasing the Retro-Search results written after it."""
    path = tmp_path / "RESULTS.md"
    write_results(path, "# pipeline, first run\n")
    assert path.read_text() == "# pipeline, first run\n"
    retro = f"{KEPT_PART}\n\n| set | EM |\n|---|---|\n| self | 0.7 |\n"
    path.write_text(path.read_text() + "\n" + retro)
    write_results(path, "# pipeline, second run\n\nnumbers\n")
    assert path.read_text() == f"# pipeline, second run\n\nnumbers\n\n{retro}"
