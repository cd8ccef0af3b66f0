"""The whole demo training pipeline: world -> tokenizer -> SFT -> RL stage 1 -> RL stage 2 ->
R1-Searcher++ -> evaluation, with RESULTS.md and plots.

Run: `make train` (= `searchagent train pipeline`). Each stage writes its checkpoint under `out`
and is skipped when that checkpoint already exists, so an interrupted run continues where it
stopped. The last RL checkpoint is copied to `artifacts/demo/rl`, which `make serve` prefers.

The SFT stage here is smaller than the committed checkpoint's (`artifacts/demo/sft`, 40 worlds,
49 minutes): the pipeline has to fit in 45 minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from training.rl import RLConfig, run_rl
from training.sft import SFTConfig, run_sft

RL_STAGES = (("rl-stage1", "1"), ("rl-stage2", "2"), ("rl-plus", "plus"))


@dataclass(frozen=True)
class PipelineConfig:
    out: Path = Path("artifacts/demo/train")
    demo: Path = Path("artifacts/demo")  # world + index (`build_demo_data`), and where rl/ goes
    results: Path = Path("RESULTS.md")
    plots: Path = Path("results")
    sft_worlds: int = 16
    sft_per_world: int = 300
    sft_steps: int = 300
    sft_copy_steps: int = 800  # at most: it stops at the copy-accuracy target
    rl_steps: int = 15
    rl_lr: float = 1e-4
    eval_limit: int = 100
    seed: int = 0


def run_pipeline(cfg: PipelineConfig) -> dict:
    from training.demo import build_demo_data
    from training.evaluate import evaluate_model

    t0 = time.monotonic()
    timings: dict[str, float] = {}  # seconds per stage run now (skipped stages have none)
    build_demo_data(cfg.demo)
    cfg.out.mkdir(parents=True, exist_ok=True)
    sft = cfg.out / "sft"
    if not (sft / "training.json").is_file():
        start = time.monotonic()
        sft.mkdir(parents=True, exist_ok=True)
        run_sft(
            SFTConfig(
                out=sft,
                world_seeds=tuple(range(1000, 1000 + cfg.sft_worlds)),
                per_world=cfg.sft_per_world,
                steps=cfg.sft_steps,
                copy_steps=cfg.sft_copy_steps,
                seed=cfg.seed,
            )
        )
        timings["sft"] = time.monotonic() - start
    previous = sft
    for i, (name, stage) in enumerate(RL_STAGES):
        ckpt = cfg.out / name
        if not (ckpt / "training.json").is_file():
            start = time.monotonic()
            run_rl(
                RLConfig(
                    init=previous,
                    out=ckpt,
                    index=cfg.demo / "index",
                    data=cfg.demo / "world" / "train.jsonl",
                    stage=stage,
                    steps=cfg.rl_steps,
                    lr=cfg.rl_lr,
                    seed=cfg.seed + 1 + i,  # each stage its own question order and samples
                )
            )
            timings[name] = time.monotonic() - start
        previous = ckpt
    test = _rows(cfg.demo / "world" / "test.jsonl", cfg.eval_limit)
    scores = {}
    for name in ("sft", *(n for n, _ in RL_STAGES)):
        start = time.monotonic()
        scores[name] = evaluate_model(cfg.out / name, cfg.demo / "index", test)
        timings[f"eval {name}"] = time.monotonic() - start
    # what `make serve` serves today, on the same questions: the bar the new checkpoint must meet
    committed = cfg.demo / "sft"
    if (committed / "config.json").is_file():
        scores["committed sft"] = evaluate_model(committed, cfg.demo / "index", test)
    installed = installs(scores)
    if installed:
        final = cfg.demo / "rl"
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(previous, final, ignore=shutil.ignore_patterns(".*"))
    plot = plot_rl(cfg.out, cfg.plots)
    report = {
        "scores": scores,
        "installed": installed,
        "seconds": round(time.monotonic() - t0, 1),
        "plot": str(plot),
    }
    write_results(cfg.results, results_markdown(cfg, scores, plot, time.monotonic() - t0, timings))
    (cfg.out / "pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def installs(scores: dict) -> bool:
    """Whether the final RL checkpoint replaces what `make serve` serves: only if its EM is at
    least the committed SFT checkpoint's (a worse model is reported, never served)."""
    final = scores[RL_STAGES[-1][0]]["em"]
    return "committed sft" not in scores or final >= scores["committed sft"]["em"]


def plot_rl(out: Path, plots: Path) -> Path:
    """One PNG: reward, EM and searches per step for each RL stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    series = (
        ("reward", "reward (the stage's own)"),
        ("rewards/em/mean", "EM (train rollouts, T=1)"),
        ("rewards/searches/mean", "searches per rollout"),
    )
    for name, _ in RL_STAGES:
        log = json.loads((out / name / "training.json").read_text())["log"]
        for ax, (key, title) in zip(axes, series, strict=True):
            points = [(row["step"], row[key]) for row in log if key in row]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
            ax.set_title(title)
            ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    path = plots / "rl.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# RESULTS.md's other part, written by hand from scripts/retro_demo.sh: a rewrite keeps it.
KEPT_PART = "# Results — Retro-Search"


def write_results(path: Path, text: str) -> None:
    """Write the pipeline's part of `path`, keeping the Retro-Search part after it."""
    old = path.read_text() if path.is_file() else ""
    at = old.find(KEPT_PART)
    kept = old[at:] if at >= 0 else ""
    path.write_text(text.rstrip("\n") + "\n" + (f"\n{kept}" if kept else ""))


def results_markdown(
    cfg: PipelineConfig, scores: dict, plot: Path, seconds: float, timings: dict[str, float]
) -> str:
    lines = [
        "# Results — the demo training pipeline",
        "",
        "Written by `make train` (`searchagent train pipeline`): world -> tokenizer -> SFT -> RL "
        "stage 1 -> RL stage 2 -> R1-Searcher++ -> evaluation, on this machine's CPU.",
        "",
        f"Total: {seconds / 60:.1f} minutes. Stage times: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
        + ".",
        "",
        f"Evaluation: the demo world's test split (first {cfg.eval_limit} questions, entities "
        "unseen in training), greedy, through the agent loop with BM25 top-3.",
        "",
        "| checkpoint | EM | cover-EM | F1 | searches per question |",
        "|---|---|---|---|---|",
    ]
    for name, s in scores.items():
        lines.append(
            f"| {name} | {s['em']:.3f} | {s['cover_em']:.3f} | {s['f1']:.3f} "
            f"| {s['avg_searches']:.2f} |"
        )
    verdict = (
        f"The final checkpoint was installed as `{cfg.demo / 'rl'}`, which `make serve` serves."
        if installs(scores)
        else "The final checkpoint scored below the committed SFT checkpoint, so it was not "
        f"installed: `make serve` keeps serving `{cfg.demo / 'sft'}`."
    )
    lines += ["", verdict, "", f"![reward, EM and searches per RL step]({plot.as_posix()})", ""]
    return "\n".join(lines)


def _rows(path: Path, limit: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit]
