"""A published checkpoint is served by pointing --model at its directory and naming the preset.

The directory has the shape of R1-Searcher's / Search-R1's Qwen2.5 releases — Qwen2 weights, a
byte-level BPE `tokenizer.json` with Qwen's special tokens, the chat template in
`tokenizer_config.json`, no `agent.json` — at toy size and randomly initialised (no model hub
here). Weights this random say nothing sensible; what is tested is the path: the server starts,
builds the preset's prompt (text or chat), decodes through the loop with the preset's text-tag
stop strings, and answers in OpenAI's shape.
"""

from __future__ import annotations

import time

import httpx
import pytest
from openai import OpenAI
from qwen_style import QUESTION, QWEN25_CHAT_TEMPLATE, write_qwen_style, write_random_qwen2

from agent.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    path = write_qwen_style(tmp_path_factory.mktemp("qwen-release"), QWEN25_CHAT_TEMPLATE)
    vocab = Tokenizer.from_dir(path, eos_token="<|im_end|>").vocab_size
    return write_random_qwen2(path, vocab)


def wait_ready(url: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/ready", timeout=2)
        if r.status_code == 200:
            return r.json()
        time.sleep(0.2)
    raise AssertionError("the server never became ready")


@pytest.mark.parametrize("preset", ["r1-searcher", "search-r1"])
def test_published_checkpoint_dir_is_served_by_naming_its_preset(
    preset, qwen_checkpoint, small_index, serve_cli
):
    """Guards against published checkpoints needing conversion: `serve --model DIR --format
    PRESET` on a Qwen2 release directory without agent.json answers chat requests."""
    args = ["serve", "--model", str(qwen_checkpoint), "--format", preset]
    args += ["--index", str(small_index), "--served-model-name", "release"]
    with serve_cli(args) as url:
        assert wait_ready(url)["model"] is True
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(
            model="release",
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=24,
        )
        choice = reply.choices[0]
        assert choice.finish_reason in ("stop", "length")
        assert reply.usage.prompt_tokens > 100  # the preset's long instruction prompt
        assert 0 < reply.usage.completion_tokens <= 24


def test_generation_ends_on_every_eos_the_checkpoint_names(qwen_checkpoint, small_index):
    """Guards against decoding straight past <|endoftext|> under the search-r1 preset (whose EOS
    is <|im_end|>): Qwen2.5's generation_config lists both, and upstream Search-R1 stops on
    both; the embedded engine stopped only on the preset's one."""
    import asyncio

    from agent.checkpoint import load_format, load_tokenizer
    from agent.engine import SamplingParams
    from agent.hf_engine import TransformersEngine
    from agent.loop import AgentLoop, RunParams
    from agent.tags import get_format
    from retrieval.index import load_index

    fmt = get_format("search-r1")
    tok = load_tokenizer(qwen_checkpoint, fmt)
    endoftext = tok.token_id("<|endoftext|>")
    assert tok.stop_ids == {tok.token_id("<|im_end|>"), endoftext}
    loop = AgentLoop(TransformersEngine(qwen_checkpoint, tok), load_index(small_index), fmt)
    forced = SamplingParams(max_tokens=8, logit_bias=((endoftext, 100.0),))

    async def run() -> list:
        prompt = loop.prompt_ids(QUESTION)
        return [e async for e in loop.run(prompt, RunParams(sampling=forced, max_tokens=8))]

    finished = asyncio.run(run())[-1]
    assert finished.trajectory.completion_ids == [endoftext]
    assert finished.reason == "stop"
    # a format whose EOS string this vocabulary lacks takes the checkpoint's own (Llama releases
    # named with a Qwen-made preset): the demo checkpoint's is <|eos|>
    demo = load_tokenizer("artifacts/demo/sft", get_format("search-r1"))
    assert demo.eos_token == "<|eos|>" and demo.stop_ids == {demo.eos_id}
    assert load_format(qwen_checkpoint, "search-r1") == fmt


def test_passages_per_search_follow_the_preset_unless_set(qwen_checkpoint, small_index):
    """Guards against R1-Searcher's checkpoint being served 3 passages per search (it was
    trained and evaluated with 5) when the operator did not choose a number."""
    from service.app import create_app
    from service.settings import Settings

    def limits(**given):
        settings = Settings(model=qwen_checkpoint, index=small_index, **given)
        return create_app(settings).state.chat.loop.limits.top_k

    assert limits(tag_format="r1-searcher") == 5
    assert limits(tag_format="search-r1") == 3
    assert limits(tag_format="r1-searcher", top_k=2) == 2
