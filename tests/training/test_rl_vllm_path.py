"""The real-scale RL path on this machine: rollouts decoded by a vLLM-shaped server over HTTP
(`RLConfig.vllm_url`, TRL's vLLM server mode) and searched through a retrieval server
(`retriever_url`), with our own service standing in for both (`agent: false` completions are
vLLM's; `/retrieve` is ours). TRL's weight push to vLLM needs a GPU server and is not run here.
Also what a long run needs: the shipped configs load, and a stopped run resumes."""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace

import pytest

from training.rl import RLConfig, _Policy, build_trainer, read_config, rollout_retriever


def demo_config(demo, out, **settings) -> RLConfig:
    """Stage-2 RL on the demo checkpoint, index and train split, two rollouts of two prompts."""
    return RLConfig(
        init=demo / "sft",
        out=out,
        data=demo / "world" / "train.jsonl",
        index=demo / "index",
        stage="2",
        prompts_per_step=2,
        num_generations=2,
        **settings,
    )


def test_rollouts_over_http_equal_the_in_process_ones(
    demo_artifacts, demo_app, serve_app, tmp_path
):
    """Guards against the vLLM path producing other trajectories than the local one (a prompt
    re-tokenized, documents not injected, env_mask off by the injected tokens) or searching
    another retriever than it was told to."""
    url = serve_app(demo_app)
    local = demo_config(
        demo_artifacts, tmp_path / "local", steps=1, temperature=0.0, max_questions=8
    )
    remote = replace(
        local,
        out=tmp_path / "remote",
        index=None,
        vllm_url=url,
        vllm_model="demo",
        vllm_extra={"agent": False},  # our server decodes plainly only when asked; vLLM always
        retriever_url=f"{url}/retrieve",
        retriever_api="searchagent",
    )
    questions = [json.loads(line)["question"] for line in local.data.open()][:2]
    prompts = [q for q in questions for _ in range(2)]  # TRL repeats each prompt per generation

    trainer = build_trainer(local)
    here = trainer.rollout_func(prompts, trainer)
    policy = _Policy(trainer.rollout_func.__self__.fmt, trainer.rollout_func.__self__.tokenizer,
                     rollout_retriever(remote), remote, golds={})  # fmt: skip
    there = policy.rollout(prompts, None)

    assert type(policy.loop.engine).__name__ == "OpenAIEngine"
    assert policy.loop.engine.stats.requests >= len(prompts)
    assert type(policy.retriever).__name__ == "RemoteRetriever"
    for key in ("prompt_ids", "completion_ids", "env_mask"):
        assert there[key] == here[key], key
    docs_open = policy.tokenizer.token_id(policy.fmt.docs_open)
    for ids, mask in zip(there["completion_ids"], there["env_mask"], strict=True):
        assert docs_open in ids  # every rollout searched and got documents over HTTP
        injected = [i for i, m in zip(ids, mask, strict=True) if m == 0]
        assert injected[0] == docs_open and 0 < len(injected) < len(ids)


def test_real_scale_configs_load(tmp_path):
    """Guards against the shipped recipe (configs/rl/*.json) drifting from RLConfig: a renamed
    field would only fail on the GPU cluster."""
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "configs" / "rl").glob("*.json"))
    assert len(configs) == 3
    for path in configs:
        cfg = read_config(path)
        assert cfg.vllm_url and cfg.retriever_url and cfg.bf16 and cfg.index is None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"init": "x", "out": "y", "data": "z", "learning_rate": 1}))
    with pytest.raises(ValueError, match="unknown field.*learning_rate"):
        read_config(bad)


def test_rl_resumes_from_its_last_checkpoint(demo_artifacts, tmp_path):
    """Guards against `--resume` starting over (the history of the first run lost, its steps
    trained twice) or not continuing to the new step count."""
    from training.rl import run_rl

    cfg = demo_config(
        demo_artifacts, tmp_path / "rl", steps=2, max_tokens=48, max_questions=16, save_steps=1
    )
    first = run_rl(cfg)
    assert first["steps"] == 2 and list((cfg.out / ".trainer").glob("checkpoint-2"))
    # another seed: a fresh start would log other rewards for steps 1 and 2
    second = run_rl(replace(cfg, steps=3, resume=True, seed=7))
    assert second["steps"] == 3
    assert [row["step"] for row in second["log"]] == [1, 2, 3]
    assert second["log"][:2] == first["log"]
    with pytest.raises(ValueError, match=r"other settings \(lr 2e-05 -> 0.001, stage '2' -> '1'\)"):
        run_rl(replace(cfg, stage="1", lr=1e-3, resume=True))  # stage 2's state is no stage 1
    with pytest.raises(ValueError, match="is at step 3 already"):
        run_rl(replace(cfg, steps=3, resume=True, seed=7))  # finished: nothing left to train
    with pytest.raises(ValueError, match="holds no RL run"):
        run_rl(replace(cfg, out=demo_artifacts / "sft"))  # an SFT checkpoint is not written over
    # a new run refused for its settings leaves the old run resumable (its checkpoints were
    # deleted first)
    with pytest.raises(ValueError, match="lr must be a finite number > 0, not 0"):
        run_rl(replace(cfg, lr=0.0))
    assert list((cfg.out / ".trainer").glob("checkpoint-3"))


def test_memorization_target_states_what_was_retrieved_as_known(demo_artifacts):
    """R1-Searcher++'s memorization target is the trace rewritten without search: the facts the
    documents gave stay, stated as recalled ("I know that …", the cold start's words), so a
    2-hop plan is not trained to jump to the answer. Also guards against training tokens the
    policy never samples: the answer block is the policy's own (`<answer> X</answer>`, not
    `<answer>X</answer>`) and no EOS follows it, since runs end at the close tag."""
    from agent.checkpoint import load_format, load_tokenizer
    from training.rl import rewritten_without_search

    fmt = load_format(demo_artifacts / "sft")
    tok = load_tokenizer(demo_artifacts / "sft", fmt)
    t_open, t_close, s_open, s_close = (
        fmt.think_open,
        fmt.think_close,
        fmt.search_open,
        fmt.search_close,
    )

    def docs(text):
        return f"{fmt.docs_open} (1) {text}{fmt.docs_close}"

    trace = (
        f"{t_open} I need the country of the birthplace of Ada Vorn, so first the birthplace"
        f" of Ada Vorn.{t_close}{s_open} Ada Vorn birthplace{s_close}{docs('Ada Vorn: born')}"
        f"{t_open} Ada Vorn was born in Velmora. Next I need the country of Velmora.{t_close}"
        f"{s_open} Velmora country{s_close}{docs('Velmora: a town')}"
        f"{t_open} Velmora is in Ostria.{t_close}{fmt.answer_open} Ostria{fmt.answer_close}"
    )
    ids = rewritten_without_search(trace, "Ostria", fmt, tok)
    assert tok.decode(ids) == tok.decode(
        tok.encode(
            f"{t_open} I need the country of the birthplace of Ada Vorn, so first the birthplace"
            " of Ada Vorn. I know that Ada Vorn was born in Velmora. Next I need the country of"
            f" Velmora. I know that Velmora is in Ostria.{t_close}{fmt.answer_open} Ostria"
            f"{fmt.answer_close}"
        )
    )
    assert ids[-2:] == tok.encode(f" Ostria{fmt.answer_close}")[-2:]
    assert tok.eos_id not in ids and tok.token_id(s_open) not in ids
    assert tok.token_id(fmt.docs_open) not in ids
    # an unfinished answer block (cut at max tokens) still ends in the gold answer
    cut = trace[: trace.rindex(fmt.answer_open)]
    assert tok.decode(rewritten_without_search(cut, "Ostria", fmt, tok)).endswith(
        f"{fmt.answer_open} Ostria{fmt.answer_close}"
    )


def test_rollouts_wait_for_a_retriever_that_comes_back(demo_artifacts, demo_app, serve_app,
                                                        free_port, tmp_path):  # fmt: skip
    """Guards against a retrieval server's restart spoiling a long run: the rollouts that found
    it down are decoded again until it answers, and none reaches the trainer with a notice
    where the documents should be."""
    import threading

    from live_server import serving

    from agent.checkpoint import load_format, load_tokenizer
    from service.app import create_app
    from service.settings import Settings

    port = free_port()  # the retrieval server is not up yet
    retrieval_app = create_app(Settings(index=demo_artifacts / "index"))
    cfg = replace(
        demo_config(demo_artifacts, tmp_path / "rl", temperature=0.0, retrieval_patience_s=120),
        index=None,
        vllm_url=serve_app(demo_app),
        vllm_model="demo",
        vllm_extra={"agent": False},
        retriever_url=f"http://127.0.0.1:{port}/retrieve",
    )
    fmt = load_format(cfg.init)
    policy = _Policy(fmt, load_tokenizer(cfg.init, fmt), rollout_retriever(cfg), cfg, golds={})
    question = json.loads(next(iter(cfg.data.open())))["question"]
    got: dict = {}
    worker = threading.Thread(
        target=lambda: got.update(policy.rollout([question] * 2, None)), daemon=True
    )
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while policy.retried == 0:  # the first rollouts found nothing listening
            assert worker.is_alive() and time.monotonic() < deadline, "no retry happened"
            time.sleep(0.05)
        with serving(retrieval_app, port):
            worker.join(timeout=120)
        assert not worker.is_alive() and got, "the rollouts did not finish once retrieval was back"
    finally:
        if not worker.is_alive():
            policy._events.run_until_complete(policy.retriever.aclose())
            policy._events.run_until_complete(policy.loop.engine.aclose())
            policy._events.close()
    for ids, mask in zip(got["completion_ids"], got["env_mask"], strict=True):
        injected = policy.tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m == 0])
        assert " (1) " in injected, injected  # passages, not a notice in their place


def test_rl_stops_when_the_retriever_stays_down_and_resumes_once_it_is_back(
    demo_artifacts, free_port, tmp_path
):
    """Guards against training on rollouts that never saw a document: with the retrieval server
    gone, `train rl` stops with one line saying so and how to resume, having trained and saved
    nothing; with the server back, `--resume` trains."""
    import subprocess
    import sys

    from live_server import serving

    from service.app import create_app
    from service.settings import Settings

    out, port = tmp_path / "rl", free_port()
    url = f"http://127.0.0.1:{port}/retrieve"
    config = tmp_path / "rl.json"
    config.write_text(json.dumps({
        "init": str(demo_artifacts / "sft"), "out": str(out),
        "data": str(demo_artifacts / "world" / "train.jsonl"), "stage": "2", "steps": 2,
        "save_steps": 1, "prompts_per_step": 2, "num_generations": 2, "max_tokens": 48,
        "retrieval_patience_s": 1, "retriever_url": url,
    }))  # fmt: skip
    cmd = [sys.executable, "-m", "service.cli", "train", "rl", "--config", str(config)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    said = rf"retrieval from {re.escape(url)} failed in [1-4] of 4 rollouts \({re.escape(url)}: "
    assert re.search(said + r"cannot connect .*\); decoding them again in 1 s", done.stderr)
    assert re.match(rf"searchagent: {said}cannot connect .*\) for \d+ s; nothing was trained", last)
    assert f"resume from the last checkpoint in {out} (train rl --resume" in last
    assert not list(out.glob(".trainer/checkpoint-*")) and not (out / "model.safetensors").exists()

    with serving(create_app(Settings(index=demo_artifacts / "index")), port):
        again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout.splitlines()[-1])["steps"] == 2
    assert (out / "model.safetensors").exists()


def test_rollouts_cut_by_their_deadline_are_never_trained_on(
    demo_artifacts, demo_app, serve_app, tmp_path, capsys
):
    """Guards against training on a rollout that a slow retriever let run out of time: its
    search's documents block holds a deadline notice, not passages, and rewarding the answer that
    followed would teach answering without documents. Such rollouts are decoded again, and the
    run stops with one line saying what happened."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from agent.checkpoint import load_format, load_tokenizer
    from training.rl import RolloutError

    async def slow(request):
        await asyncio.sleep(4)  # longer than the rollouts' 2 s
        return JSONResponse({"results": []})

    slow_url = serve_app(Starlette(routes=[Route("/retrieve", slow, methods=["POST"])]))
    cfg = replace(
        demo_config(demo_artifacts, tmp_path / "rl", temperature=0.0),
        index=None,
        vllm_url=serve_app(demo_app),
        vllm_model="demo",
        vllm_extra={"agent": False},
        retriever_url=f"{slow_url}/retrieve",
        rollout_deadline_s=2,
        retrieval_patience_s=1,
    )
    fmt = load_format(cfg.init)
    policy = _Policy(fmt, load_tokenizer(cfg.init, fmt), rollout_retriever(cfg), cfg, golds={})
    question = json.loads(next(iter(cfg.data.open())))["question"]
    said = r"[12] of 2 rollouts ran past their 2 s deadline \(cut while (searching|decoding)\)"
    with pytest.raises(RolloutError, match=said + r" for \d+ s; nothing was trained on them"):
        policy.rollout([question] * 2, None)
    assert re.search(said + "; decoding them again in 1 s", capsys.readouterr().err)
    assert policy.retried == 1
    policy._events.run_until_complete(policy.retriever.aclose())
    policy._events.run_until_complete(policy.loop.engine.aclose())
    policy._events.close()
    with pytest.raises(ValueError, match="rollout_deadline_s must be seconds > 0, not 0"):
        build_trainer(replace(cfg, rollout_deadline_s=0))
