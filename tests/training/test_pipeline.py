"""training/pipeline.py's report: RL logs become one PNG and RESULTS.md's table."""

from __future__ import annotations

import json
from pathlib import Path

from training.pipeline import (
    COMMITTED,
    DEMO_TEST,
    EVAL_ROWS,
    FAMOUS,
    KEPT_PART,
    RL_STAGES,
    SECOND_WORLD,
    TYPES,
    PipelineConfig,
    eval_sets,
    installs,
    plot_rl,
    results_markdown,
    targets,
    write_results,
)
from training.world import read_jsonl


def test_rl_logs_become_a_plot_and_a_results_table(tmp_path):
    """Guards against: a stage's log missing from the plot (a silent KeyError skip), a PNG that
    is not one, and a results table that drops a checkpoint or mislabels its numbers."""
    for i, (name, _, _) in enumerate(RL_STAGES):
        log = [
            {"step": s, "reward": 0.1 * s + i, "rewards/em/mean": 0.5, "rewards/searches/mean": 1.0}
            for s in range(1, 6)
        ]
        (tmp_path / name).mkdir()
        (tmp_path / name / "training.json").write_text(json.dumps({"log": log}))
    png = plot_rl(tmp_path, tmp_path / "plots")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    row = {"n": 150, "em": 0.72, "cover_em": 0.73, "f1": 0.722, "avg_searches": 0.98,
           "avg_tokens": 61.0, "by_type": {"1hop": {"n": 90, "em": 0.9, "f1": 0.91},
                                           "2hop": {"n": 60, "em": 0.45, "f1": 0.5}}}  # fmt: skip
    scores = {DEMO_TEST: {name: row for name, _, _ in EVAL_ROWS}}
    timings = {"sft": 600.0, "rl-stage1": 120.0}
    text = results_markdown(PipelineConfig(), scores, png, 900.0, timings)
    cells = "0.720 | 0.722 | 0.900 | 0.910 | 0.450 | 0.500 | – | – | 0.98 | 61.0"
    for name, _, _ in EVAL_ROWS:
        assert f"| {name} | {cells} |" in text
    assert "Total: 15.0 minutes" in text and "sft 10.0 min" in text and png.as_posix() in text
    assert "## demo test:" in text and "n = 150" in text


def _score(em: float, searches: float = 1.0, two_hop: float = 0.0) -> dict:
    return {"n": 10, "em": em, "cover_em": em, "f1": em, "avg_searches": searches,
            "by_type": {"2hop": {"n": 4, "em": two_hop, "f1": two_hop}}}  # fmt: skip


def test_targets_are_judged_on_the_right_rows():
    """Guards against a target reported as met from the wrong row or set (e.g. RL++'s searches
    compared on the test set instead of the famous-entity questions)."""
    scores = {
        DEMO_TEST: {"no-retrieval": _score(0.0), "naive RAG": _score(0.3, two_hop=0.2),
                    "SFT": _score(0.6), "RL (R1-Searcher)": _score(0.66, two_hop=0.4),
                    "RL++ (R1-Searcher++)": _score(0.645)},
        SECOND_WORLD: {"no-retrieval": _score(0.02)},
        FAMOUS: {"RL (R1-Searcher)": _score(0.9, 2.0), "RL++ (R1-Searcher++)": _score(0.9, 1.5)},
    }  # fmt: skip
    met = {target: ok for target, ok, _ in targets(scores)}
    assert list(met.values()) == [True, True, True, True, True]
    scores[FAMOUS]["RL++ (R1-Searcher++)"] = _score(0.9, 1.6)  # 20% fewer: not enough
    scores[DEMO_TEST]["RL (R1-Searcher)"] = _score(0.64, two_hop=0.39)
    scores[SECOND_WORLD]["no-retrieval"] = _score(0.1)
    assert [ok for _, ok, _ in targets(scores)] == [False, False, True, False, False]
    text = results_markdown(PipelineConfig(), scores, PipelineConfig().plots / "rl.png", 1.0, {})
    assert "| RL >= SFT + 5 EM points (demo test) | **no** | RL 0.640, SFT 0.600 |" in text


def test_a_worse_final_checkpoint_is_not_installed():
    """Guards against: `make train` replacing the served model with one that answers worse."""
    final = EVAL_ROWS[-1][0]
    worse = {DEMO_TEST: {final: _score(0.1), COMMITTED: _score(0.72)}}
    better = {DEMO_TEST: {final: _score(0.75), COMMITTED: _score(0.72)}}
    assert not installs(worse) and installs(better)
    text = results_markdown(PipelineConfig(), worse, PipelineConfig().plots / "rl.png", 60.0, {})
    assert "was not installed" in text and f"| {COMMITTED} | 0.720 |" in text


def test_evaluation_sets_are_sampled_across_types_and_famous_entities(tmp_path):
    """Guards against the first-N questions of a split (all 1-hop) standing for the test set,
    and an empty or mixed famous-entity set."""
    from training.demo import build_demo_data

    build_demo_data(tmp_path)
    sets = eval_sets(PipelineConfig(demo=tmp_path, eval_limit=60))
    assert [name for name, _, _ in sets] == [DEMO_TEST, SECOND_WORLD, FAMOUS]
    for _, index, rows in sets[:2]:
        assert len(rows) == 60 and (index / "index.json").is_file()
        assert {r["type"] for r in rows} == {"1hop", "2hop", "comparison"}
    assert sets[0][2] == eval_sets(PipelineConfig(demo=tmp_path, eval_limit=60))[0][2]
    whole = eval_sets(PipelineConfig(demo=tmp_path))  # the default: every test question
    assert [len(rows) for _, _, rows in whole[:2]] == [
        len(read_jsonl(tmp_path / world / "test.jsonl")) for world in ("world", "world2")
    ]
    world = json.loads((tmp_path / "world" / "world.json").read_text())
    famous = {e["name"] for e in world["entities"] if e["famous"]}
    assert sets[2][2] and all(r["entities"][0] in famous for r in sets[2][2])


def test_rewriting_results_keeps_the_retro_search_part(tmp_path):
    """Guards against `make train` erasing the Retro-Search results written after it."""
    path = tmp_path / "RESULTS.md"
    write_results(path, "# pipeline, first run\n")
    assert path.read_text() == "# pipeline, first run\n"
    retro = f"{KEPT_PART}\n\n| set | EM |\n|---|---|\n| self | 0.7 |\n"
    path.write_text(path.read_text() + "\n" + retro)
    write_results(path, "# pipeline, second run\n\nnumbers\n")
    assert path.read_text() == f"# pipeline, second run\n\nnumbers\n\n{retro}"


def test_rl_trains_on_the_question_types_asked_for(tmp_path):
    """Guards against a stage's question types being ignored (the multi-hop stages would then
    spend their few steps on 1-hop questions the cold start answers) or training on nothing."""
    import pytest

    from training.rl import _read_rows

    data = tmp_path / "train.jsonl"
    rows = [{"question": f"q{i}", "answer": "a", "type": t} for i, t in enumerate(TYPES * 4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    picked = _read_rows(data, None, 0, ("2hop", "comparison"))
    assert sorted(r["question"] for r in picked) == sorted(
        r["question"] for r in rows if r["type"] != "1hop"
    )
    assert len(_read_rows(data, None, 0)) == len(rows)
    with pytest.raises(ValueError, match="no questions of type"):
        _read_rows(data, None, 0, ("4hop",))


def test_pipeline_refuses_an_sft_init_that_is_no_checkpoint(tmp_path, capsys):
    """Guards against `--sft-init` pointing nowhere and the run training RL from nothing."""
    import pytest

    from service.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "pipeline", "--sft-init", str(tmp_path), "--out", str(tmp_path / "o")])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sft-init" in err[0] and "no config.json" in err[0]


def test_a_rerun_with_other_settings_does_not_mix_two_runs(tmp_path, capsys):
    """Guards against the resume rule (a stage with a checkpoint is skipped) silently pairing
    one run's RL checkpoints with another run's settings, or with a run whose settings were
    never recorded, while a rerun that only changes the report still resumes."""
    import os
    from dataclasses import replace

    import pytest

    from service.cli import main
    from training.pipeline import check_settings

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    cfg = PipelineConfig(out=tmp_path / "run", sft_init=ckpt)
    check_settings(cfg)
    recorded = json.loads((cfg.out / "settings.json").read_text())
    assert recorded["rl_steps"] == 40 and recorded["sft_init"] == str(ckpt)
    check_settings(cfg)
    check_settings(replace(cfg, eval_limit=30, results=tmp_path / "R.md"))
    relative = {"out": Path(os.path.relpath(cfg.out)), "sft_init": Path(os.path.relpath(ckpt))}
    check_settings(replace(cfg, **relative))  # the same run, its paths spelled otherwise
    with pytest.raises(ValueError, match=r"rl_lr 0.0001 -> 0.001, rl_steps 40 -> 3"):
        check_settings(replace(cfg, rl_steps=3, rl_lr=1e-3))
    assert json.loads((cfg.out / "settings.json").read_text()) == recorded

    (tmp_path / "old" / "rl-stage1").mkdir(parents=True)
    (tmp_path / "old" / "rl-stage1" / "config.json").write_text("{}")
    argv = ["train", "pipeline", "--sft-init", str(ckpt), "--out", str(tmp_path / "old")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "settings were not recorded" in err[0]
    assert not (tmp_path / "old" / "settings.json").exists()


def test_sft_refuses_a_knowledge_world_that_is_no_world(tmp_path, capsys):
    """Guards against `train sft --knowledge` on a directory without a world's files, or
    without a checkpoint to fine-tune, failing with a traceback halfway through."""
    import pytest

    from service.cli import main

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (tmp_path / "corpus.jsonl").write_text("")
    for argv, words in (
        (["--init", str(ckpt), "--knowledge", str(tmp_path)], "no train.jsonl"),
        (["--knowledge", str(tmp_path)], "needs --init"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "sft", *argv, "--out", str(tmp_path / "o")])
        assert exit_info.value.code != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--knowledge" in err[0] and words in err[0]


def test_a_small_or_asked_off_run_never_installs_what_is_served():
    """Guards against a smoke run (`--eval-limit 3`: every row scores 1.0 on three 1-hop
    questions) replacing artifacts/demo/rl, the checkpoint `make serve` serves."""
    from training.pipeline import may_install

    assert may_install(PipelineConfig()) is None
    assert "--eval-limit 3 scores a sample" in may_install(PipelineConfig(eval_limit=3))
    assert may_install(PipelineConfig(install=False)) == "--no-install"
