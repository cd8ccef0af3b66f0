"""`training/rl.py`'s settings and export: what `train rl` writes is a checkpoint that `serve` and
`eval` load as trained (its tag format, its whole tokenizer), and what the real-scale recipe sets
reaches TRL and the rollouts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from qwen_style import QWEN25_CHAT_TEMPLATE, write_qwen_style, write_random_qwen2

from agent.tokenizer import Tokenizer
from training.rl import RLConfig, build_trainer, grpo_args, read_config, run_rl

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "rl"


@pytest.fixture(scope="module")
def qwen_jinja(tmp_path_factory) -> Path:
    """A Qwen-style release without agent.json whose chat template is in `chat_template.jinja`
    (where transformers 5 saves it), not in tokenizer_config.json."""
    path = write_qwen_style(tmp_path_factory.mktemp("qwen-jinja"), None)
    (path / "chat_template.jinja").write_text(QWEN25_CHAT_TEMPLATE)
    return write_random_qwen2(path, Tokenizer.from_dir(path, eos_token="<|im_end|>").vocab_size)


@pytest.mark.parametrize("preset", ["r1-searcher", "search-r1"])
def test_rl_export_keeps_the_trained_format_and_tokenizer(preset, qwen_jinja, demo_artifacts,
                                                          tmp_path):  # fmt: skip
    """Guards against the RL export writing the `default` agent.json whatever format it trained
    (a Qwen checkpoint then fails to load: `<|eos|>` is not in its vocabulary), and against it
    dropping tokenizer files other than tokenizer.json/tokenizer_config.json (a chat format's
    template in chat_template.jinja lost: `eval` refuses the checkpoint). Also that the export,
    gathered through `accelerator.get_state_dict`, is a loadable bf16 checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    from agent.checkpoint import load_format, load_tokenizer
    from agent.loop import AgentLoop
    from agent.scripted import ScriptedEngine

    out = tmp_path / "rl"
    cfg = RLConfig(
        init=qwen_jinja, out=out, data=demo_artifacts / "world" / "train.jsonl",
        index=demo_artifacts / "index", stage="1", steps=1, prompts_per_step=2,
        num_generations=2, max_tokens=12, max_searches=1, format=preset, max_questions=20,
        save_steps=1,
    )  # fmt: skip
    report = run_rl(cfg)
    assert report["steps"] == 1
    assert json.loads((out / "agent.json").read_text())["format"] == preset
    assert (out / "chat_template.jinja").read_text() == QWEN25_CHAT_TEMPLATE
    fmt = load_format(out)  # no --format: agent.json names it
    assert fmt.name == preset
    tok = load_tokenizer(out, fmt)
    loop = AgentLoop(ScriptedEngine(tok, []), None, fmt)
    prompt = tok.decode(loop.prompt_ids("Where was Gal Borin born?"))
    if fmt.chat:
        assert prompt.startswith("<|im_start|>system\n")  # built through the exported template
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    initial = AutoModelForCausalLM.from_pretrained(str(qwen_jinja))
    assert model.state_dict().keys() == initial.state_dict().keys()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def demo_config(demo, out, **settings) -> RLConfig:
    return RLConfig(
        init=demo / "sft", out=out, data=demo / "world" / "train.jsonl", index=demo / "index",
        num_generations=2, max_questions=16, **settings,
    )  # fmt: skip


def test_real_scale_settings_reach_trl(tmp_path):
    """Guards against the vLLM path crashing at its first step (TRL's importance-sampling
    correction, on by default, subtracting the sampling logprobs our rollouts do not return),
    against activation checkpointing forced off for a 7B model, and against the recipe's rollouts
    capped at the loop's default context of 2048 tokens."""
    from training.model import activation_checkpointing

    (key,) = activation_checkpointing(True)
    for path in sorted(CONFIGS.glob("*7b*.json")):
        cfg = read_config(path)
        args = grpo_args(cfg)
        assert args.use_vllm and args.vllm_importance_sampling_correction is False, path.name
        assert getattr(args, key) is True, path.name
        assert cfg.max_context >= 8192, path.name
    demo = grpo_args(RLConfig(init=tmp_path, out=tmp_path / "rl", data=tmp_path / "d.jsonl"))
    assert not demo.use_vllm and getattr(demo, key) is False


def test_rollouts_run_within_the_configured_context(demo_artifacts, tmp_path):
    """Guards against `max_context` not reaching the rollouts' loop (it ran with `Limits`'
    default 2048 whatever the config said), and checks `rollout/length_ratio`, the share of
    rollouts their budget cut (TRL's `completions/clipped_ratio` is 1.0 whatever happens)."""
    cfg = demo_config(demo_artifacts, tmp_path / "rl", max_context=24, steps=1)
    trainer = build_trainer(cfg)
    policy = trainer.rollout_func.__self__
    questions = [json.loads(line)["question"] for line in cfg.data.open()][:2]
    out = trainer.rollout_func([q for q in questions for _ in range(2)], trainer)
    assert policy.loop.limits.max_context == 24
    assert all(len(prompt) < 24 for prompt in out["prompt_ids"])  # room to start, not to finish
    assert trainer._metrics["train"]["rollout/length_ratio"] == [1.0]
    assert not any(r.format_ok for r in out["rollout"])
    roomy = build_trainer(replace(cfg, out=tmp_path / "roomy", max_context=2048))
    roomy.rollout_func([q for q in questions for _ in range(2)], roomy)
    assert roomy._metrics["train"]["rollout/length_ratio"][0] < 1.0


def test_memorization_loss_weighs_mu_per_optimizer_step(demo_artifacts, tmp_path, monkeypatch):
    """Guards against R1-Searcher++'s memorization loss counting gradient-accumulation times
    over: TRL divides its policy loss by the accumulation steps, and the mu x NLL added on each
    micro-step over the generation's rows was not, so with GA micro-steps an optimizer step
    weighed the same rows GA x mu. Over one optimizer step the micro-steps' parts must give the
    gradient of mu x NLL of the rows, each row computed once."""
    import torch

    import training.rl as rl
    from agent.loop import AgentLoop
    from agent.scripted import ScriptedEngine

    cfg = demo_config(demo_artifacts, tmp_path / "rl", stage="plus", steps=1, per_device_batch=4,
                      gradient_accumulation_steps=2, max_tokens=96, mu=0.5)  # fmt: skip
    trainer = build_trainer(cfg)
    policy = trainer.rollout_func.__self__
    model = trainer.accelerator.unwrap_model(trainer.model)
    fmt, tok = policy.fmt, policy.tokenizer
    completion = tok.encode(
        f"{fmt.think_open} I know it.{fmt.think_close}{fmt.answer_open} Ostria{fmt.answer_close}"
    )
    prompts = AgentLoop(ScriptedEngine(tok, []), None, fmt)
    questions = [json.loads(line)["question"] for line in cfg.data.open()][:5]
    # completions of one length: the mean NLL of each micro-step's rows and of all rows agree
    rows = [(prompts.prompt_ids(q), completion) for q in questions]
    pad = trainer.processing_class.pad_token_id

    def grads(loss) -> list:
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.train()
    policy.memorize = rows
    trainer.current_gradient_accumulation_steps = 2  # what the training loop sets
    assert trainer.args.steps_per_generation == 2
    parts = []
    for micro in range(2):  # the two micro-steps of one optimizer step
        trainer._step = micro
        parts.append(trainer.memorization_loss(model))
    split = grads(parts[0] + parts[1])
    whole = grads(cfg.mu * rl.memorization_nll(model, rows, pad))
    for a, b in zip(split, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)

    # and in training: one optimizer step computes each of the generation's rows once
    trainer._step = 0
    computed: list[int] = []  # rows per memorization forward
    memorized: list[int] = []  # rows per generation
    real_nll, real_output = rl.memorization_nll, policy._output

    def counting_nll(model, rows, pad_id):
        computed.append(len(rows))
        return real_nll(model, rows, pad_id)

    def counting_output(prompts, finished):
        out = real_output(prompts, finished)
        memorized.append(len(policy.memorize))
        return out

    monkeypatch.setattr(rl, "memorization_nll", counting_nll)
    monkeypatch.setattr(policy, "_output", counting_output)
    trainer.train()
    assert len(memorized) == 1 and memorized[0] > 0, "no correct searching rollout to memorize"
    assert sum(computed) == memorized[0] and len(computed) <= 2


def test_a_run_recorded_before_a_setting_existed_still_resumes(tmp_path):
    """Guards against `--resume` refusing a run recorded before `max_context` and
    `gradient_checkpointing` were settings ("other settings (max_context None -> 2048)"): such
    a run had their defaults. A setting that really changed is still refused."""
    from training.rl import RUN_FILE, _check_resume, _run_settings

    cfg = RLConfig(init=tmp_path / "init", out=tmp_path / "rl", data=tmp_path / "d.jsonl",
                   steps=4, resume=True)  # fmt: skip
    (cfg.out / ".trainer" / "checkpoint-2").mkdir(parents=True)
    old = {k: v for k, v in _run_settings(cfg).items()
           if k not in ("max_context", "gradient_checkpointing")}  # fmt: skip
    (cfg.out / RUN_FILE).write_text(json.dumps(old))
    assert _check_resume(cfg)
    with pytest.raises(ValueError, match=r"other settings \(max_context 2048 -> 4096\)"):
        _check_resume(replace(cfg, max_context=4096))
