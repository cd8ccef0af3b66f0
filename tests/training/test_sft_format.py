"""`train sft --format` / `train rl --format`: a cold start trained in another preset's tags, the
agent.json that names it, and the refusals when a run's format and its init checkpoint's differ."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest
from small_world import SMALL_WORLD

from agent.checkpoint import load_format, load_tokenizer
from agent.loop import AgentLoop
from agent.scripted import ScriptedEngine
from agent.tags import get_format
from retrieval.bm25 import BM25Retriever

R1 = get_format("r1-searcher")


@pytest.fixture(scope="module")
def r1_checkpoint(tmp_path_factory) -> Path:
    """Two SFT steps of the tiny model on oracle trajectories in R1-Searcher's tags."""
    from training.model import TINY_TEST
    from training.sft import SFTConfig, run_sft
    from training.world import WorldConfig

    out = tmp_path_factory.mktemp("r1-sft")
    cfg = SFTConfig(
        out=out, world_seeds=(7,), world=WorldConfig(**SMALL_WORLD), per_world=20,
        size=TINY_TEST, copy_steps=0, steps=2, batch_size=4, format="r1-searcher",
    )  # fmt: skip
    run_sft(cfg)
    return out


def _world_rows(fmt, checkpoint: Path) -> tuple[list[dict], object]:
    """The SFT rows `run_sft` builds for world 7, with the checkpoint's tokenizer as served."""
    from training.sft import SFTConfig, _trajectories
    from training.world import (
        WorldConfig,
        generate_world,
        make_questions,
        render_corpus,
        split_questions,
    )

    world = generate_world(WorldConfig(seed=7, **SMALL_WORLD))
    train = split_questions(make_questions(world), 7)["train"]
    tok = load_tokenizer(checkpoint, fmt)
    cfg = SFTConfig(out=checkpoint, per_world=12)
    rows = asyncio.run(_trajectories([(render_corpus(world), train)], tok, cfg, fmt))
    return rows, tok


def test_sft_in_r1_searcher_tags_is_served_and_evaluated_in_them(r1_checkpoint, small_world,
                                                                  small_index):  # fmt: skip
    """Guards against `train sft --format` training in one format and exporting another: the
    agent.json must name the preset, so `serve` and `eval` (no --format) build R1-Searcher's
    prompt and stop on its tags for the checkpoint."""
    from training.evaluate import evaluate_model

    assert json.loads((r1_checkpoint / "agent.json").read_text())["format"] == "r1-searcher"
    fmt = load_format(r1_checkpoint)  # what serve and eval read
    assert fmt == R1
    tok = load_tokenizer(r1_checkpoint, fmt)
    loop = AgentLoop(ScriptedEngine(tok, []), None, fmt)
    assert tok.decode(loop.prompt_ids("Who founded Edin Theatre?")) == R1.prompt(
        "Who founded Edin Theatre?"
    )  # no BOS: R1-Searcher's base model has none
    rows = [json.loads(x) for x in (small_world / "train.jsonl").read_text().splitlines()[:2]]
    report = evaluate_model(r1_checkpoint, small_index, rows, max_tokens=16)
    assert report["n"] == 2


def test_r1_searcher_trajectories_use_its_tags_and_mask_its_documents(r1_checkpoint):
    """Guards against a `--format` cold start whose oracle still writes our own tags (the policy
    then never emits R1-Searcher's query tags and is never given documents), and against its
    documents, rendered in R1-Searcher's layout, getting a training label."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    from training.model import no_activation_checkpointing

    rows, tok = _world_rows(R1, r1_checkpoint)
    assert rows
    for row in rows:
        text = tok.decode(row["input_ids"])
        assert text.startswith(R1.prompt_template.split("{question}")[0])
        for tag in ("<|begin_of_query|>", "<|end_of_query|>", "<|begin_of_documents|>\n(1)Title:",
                    "<|end_of_documents|>", "</think><answer> "):  # fmt: skip
            assert tag in text, tag
        assert "<search>" not in text and "<documents>" not in text
        said = text.split("\nAssistant: <think>", 1)[1]  # the prompt opens the one thought
        assert "<think>" not in said and said.count("</think>") == 1  # ... holding every search
        ids, mask = row["input_ids"], row["assistant_masks"]
        masked = tok.decode([i for i, m in zip(ids, mask, strict=True) if not m])
        prompt_end = masked.index("Assistant: <think>") + len("Assistant: <think>")
        blocks = masked[prompt_end:].split("<|end_of_documents|>\n\n")[:-1]
        assert blocks and all(b.startswith("\n\n<|begin_of_documents|>\n(1)") for b in blocks)
        trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
        assert "Title:" not in trained and "<|begin_of_documents|>" not in trained

    row = random.Random(0).choice(rows)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(str(r1_checkpoint)),
        args=SFTConfig(
            output_dir=str(r1_checkpoint / ".t"),
            report_to="none",
            use_cpu=True,
            max_length=None,
            **no_activation_checkpointing(),
        ),  # fmt: skip
        train_dataset=Dataset.from_list([row]),
        processing_class=PreTrainedTokenizerFast.from_pretrained(str(r1_checkpoint)),
    )
    labels = trainer.train_dataset[0]["labels"]
    for token, keep, label in zip(row["input_ids"], row["assistant_masks"], labels, strict=True):
        assert label == (token if keep else -100)


def _cli_error(argv: list[str], capsys) -> str:
    from service.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_rl_refuses_a_format_its_init_was_not_trained_in(r1_checkpoint, small_world, small_index,
                                                         tmp_path, capsys):  # fmt: skip
    """Guards against an RL run whose rollouts use other tags than its cold start: the policy
    never writes a search or answer the loop recognises, every reward is 0 and the run "trains"
    for hours. It also names the presets when one is unknown."""
    run = ["train", "rl", "--init", str(r1_checkpoint), "--out", str(tmp_path / "rl"),
           "--index", str(small_index), "--data", str(small_world / "train.jsonl")]  # fmt: skip
    err = _cli_error([*run, "--format", "default"], capsys)
    assert "'r1-searcher'" in err and "'default'" in err
    err = _cli_error([*run, "--format", "r1"], capsys)
    assert "known: default, r1-searcher, search-r1" in err
    assert not (tmp_path / "rl").exists()


def test_sft_on_an_init_keeps_its_format_unless_told_to_switch(r1_checkpoint, tmp_path, capsys):
    """Guards against `train sft --init` silently retraining a checkpoint in other tags (and
    exporting an agent.json that no longer matches what most of its training taught)."""
    from training.sft import training_format

    base = ["train", "sft", "--init", str(r1_checkpoint), "--out", str(tmp_path / "o")]
    err = _cli_error([*base, "--format", "search-r1"], capsys)
    assert "'r1-searcher'" in err and "--switch-format" in err
    assert "known: default" in _cli_error([*base, "--format", "nope"], capsys)
    assert training_format(r1_checkpoint, None) == R1  # no --format: the init's
    assert training_format(None, None) is None  # a fresh run: the caller's default

    from training.model import TINY_TEST
    from training.sft import SFTConfig, run_sft
    from training.world import WorldConfig

    retagged = tmp_path / "retagged"
    run_sft(SFTConfig(
        out=retagged, init=r1_checkpoint, world_seeds=(7,), world=WorldConfig(**SMALL_WORLD),
        per_world=8, size=TINY_TEST, steps=1, batch_size=4, format="default", switch_format=True,
    ))  # fmt: skip
    assert load_format(retagged).name == "default"


def test_a_search_r1_cold_start_oracle_speaks_through_a_chat_template(tmp_path):
    """Guards against `--format search-r1` (a chat format) failing on the demo tokenizer, which
    has no chat template: the fresh tokenizer gets one, and the trajectories carry Search-R1's
    tags and documents layout."""
    from agent.tokenizer import Tokenizer
    from training.oracle import oracle_trajectory
    from training.sft import _tokenizer_texts
    from training.tokenizer import DEMO_CHAT_TEMPLATE, save_tokenizer, train_tokenizer
    from training.world import (
        WorldConfig,
        generate_world,
        make_questions,
        render_corpus,
        split_questions,
    )

    fmt = get_format("search-r1")
    world = generate_world(WorldConfig(seed=7, **SMALL_WORLD))
    corpus, train = render_corpus(world), split_questions(make_questions(world), 7)["train"]
    save_tokenizer(train_tokenizer(_tokenizer_texts([(corpus, train)], fmt)), tmp_path,
                   DEMO_CHAT_TEMPLATE)  # fmt: skip
    ours = Tokenizer.from_dir(tmp_path, "<|eos|>", "<|bos|>")
    tok = Tokenizer.from_dir(tmp_path, fmt.eos, fmt.bos, extra_eos=[ours.eos_id])
    question = next(q for q in train if q["type"] == "2hop")
    traj = asyncio.run(oracle_trajectory(question, tok, BM25Retriever.build(corpus), fmt, 3))
    assert traj is not None
    prompt, said = tok.decode(traj.prompt_ids), tok.decode(traj.completion_ids)
    assert prompt.startswith("<|bos|> user: Answer the given question.")
    assert prompt.endswith("<|bos|> assistant:")
    assert said.count("<search> ") == 2 and said.count('<information>Doc 1(Title: "') == 2
    assert said.endswith(f"<answer> {question['answer']}</answer>")


def test_sft_continues_a_qwen_style_release_in_r1_searcher_tags(tmp_path):
    """Guards against `train sft --init <a Qwen release> --format r1-searcher` (the cold start
    the R1-Searcher++ config starts from) failing before it trained: the run loaded the init's
    tokenizer with our <|eos|> and <|bos|>, which a Qwen vocabulary lacks."""
    from qwen_style import write_qwen_style, write_random_qwen2

    from agent.tokenizer import Tokenizer
    from training.sft import SFTConfig, run_sft
    from training.world import WorldConfig

    init = write_qwen_style(tmp_path / "qwen", None)
    write_random_qwen2(init, Tokenizer.from_dir(init, eos_token="<|im_end|>").vocab_size)
    out = tmp_path / "sft"
    cfg = SFTConfig(
        out=out, init=init, world_seeds=(7,), world=WorldConfig(**SMALL_WORLD), per_world=8,
        steps=1, batch_size=4, format="r1-searcher",
    )  # fmt: skip
    report = run_sft(cfg)
    assert report["trajectories"] > 0
    assert load_format(out).name == "r1-searcher"
    tok = load_tokenizer(out, load_format(out))
    assert tok.eos_token == R1.eos and tok.bos_id is None
