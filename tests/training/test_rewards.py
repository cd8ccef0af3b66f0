"""`training/rewards.py`: what counts as a well-formed trace, judged on runs of the real agent
loop (a scripted engine replays the model's segments; retrieval is a fixed passage)."""

from __future__ import annotations

import asyncio

import pytest

from agent.checkpoint import load_format, load_tokenizer
from agent.events import Finished
from agent.loop import AgentLoop, Limits, RunParams
from agent.scripted import ScriptedEngine
from agent.tags import get_format
from retrieval.types import Passage
from training import rewards


class OnePassage:
    async def search(self, queries, k):
        return [[Passage(id="1", title="Paris", text="Paris is in France", score=1.0)]] * len(
            queries
        )


@pytest.fixture(scope="module")
def demo(demo_artifacts):
    fmt = load_format(demo_artifacts / "sft")
    return fmt, load_tokenizer(demo_artifacts / "sft", fmt)


def run(fmt, tok, segments: list[str]) -> rewards.Rollout:
    loop = AgentLoop(ScriptedEngine(tok, [tok.encode(s) for s in segments]), OnePassage(), fmt,
                     Limits())  # fmt: skip

    async def go() -> Finished:
        async for event in loop.run(loop.prompt_ids("Where is Paris?"), RunParams()):
            if isinstance(event, Finished):
                return event
        raise AssertionError("the run did not finish")

    return rewards.rollout_from(asyncio.run(go()), fmt)


def test_a_trace_without_answer_tags_is_malformed(demo):
    """Guards against the rewards taking the loop's free-text fallback answer as well-formed: a
    trace that ends on EOS without answer tags got stage 2's full F1 and no -2 penalty, the full
    format reward and stage 1's full reward, so RL never taught the answer tags."""
    fmt, tok = demo
    search = "<think> x</think><search> Paris</search>"
    good = run(fmt, tok, [search, "<think> ok</think><answer> France</answer>"])
    assert good.format_ok and good.answer == "France"
    assert rewards.format_reward(good) == 1.0 and rewards.stage2_reward(good, "France") == 1.0
    assert rewards.stage1_reward(good) == 1.0

    untagged = run(fmt, tok, [search, "<think> ok</think> France<|eos|>"])
    assert untagged.answer == "France"  # what the loop reads; the format is still wrong
    assert not untagged.format_ok and rewards.format_reward(untagged) == 0.0
    assert rewards.stage2_reward(untagged, "France") == 1.0 + rewards.STAGE2_FORMAT_PENALTY
    assert rewards.stage1_reward(untagged) == rewards.STAGE1_RETRIEVAL
    assert rewards.plus_rewards([untagged], ["France"]) == [1.0]  # cover-EM only, no format

    for segments in (
        ["<think> x</think> France<|eos|>"],  # no tags, no search
        [search, "<think> ok <answer> France</answer>"],  # answer inside an open thought
        [search, "<think> ok</think><answer> Spain <answer> France</answer>"],  # two answers
    ):
        assert not run(fmt, tok, segments).format_ok, segments


def test_answer_well_formed_for_a_prompt_that_opens_the_thought():
    """R1-Searcher's prompt ends with "Assistant: <think>": its answer must follow a think-close
    tag, and its searches sit inside the thought."""
    fmt = get_format("r1-searcher")
    ok = " x<|begin_of_query|> q<|end_of_query|>\n\n<|begin_of_documents|>\n(1)d\n"
    ok += "<|end_of_documents|>\n\n y </think>\n\n<answer> France </answer>"
    assert rewards.answer_well_formed(ok, fmt)
    assert not rewards.answer_well_formed(" x y <answer> France </answer>", fmt)
    assert not rewards.answer_well_formed(" x </think>\n\n<answer> France", fmt)  # not closed
