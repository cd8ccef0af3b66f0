"""TransformersEngine on a real (tiny, suite-trained) checkpoint: prefix reuse and sharing,
cancellation, failure isolation."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from dataclasses import replace

import pytest
import torch

from agent.checkpoint import load_format, load_tokenizer
from agent.engine import SamplingParams, StopSpec
from agent.hf_engine import TransformersEngine


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    fmt = load_format(tiny_checkpoint)
    return TransformersEngine(tiny_checkpoint, load_tokenizer(tiny_checkpoint, fmt), device="cpu")


def generate(engine, ids, n=12, stop=StopSpec()):
    async def go():
        out = []
        async for chunk in engine.generate(ids, SamplingParams(max_tokens=n), stop):
            out += chunk.ids
        return out

    return asyncio.run(go())


def test_continuation_prefills_only_the_new_tokens(engine):
    """Guards against re-running the prefix after documents are injected: the second call must
    feed only the injected ids plus the last sampled token (never fed before)."""
    tok = engine.tokenizer
    prompt = [tok.bos_id] + tok.encode(" question: Where was Gal Borin born? ")
    first = generate(engine, prompt)
    injected = tok.encode(" (1) Gal Borin: Gal Borin was born in Velmora.")
    before = (engine.stats.prefill_tokens, engine.stats.reused_tokens)
    second = generate(engine, prompt + first + injected)
    assert engine.stats.prefill_tokens - before[0] == len(injected) + 1
    assert engine.stats.reused_tokens - before[1] == len(prompt) + len(first) - 1
    assert len(second) == 12


def test_parked_sessions_stay_within_their_token_budget(tiny_checkpoint):
    """Guards against parked keys/values growing with the number of conversations up to the
    session count alone (32 runs of 8k tokens on a 7B: 15 GB): past `max_parked_tokens` the least
    recently used session is evicted, and a run longer than the whole budget is not parked."""
    tok = load_tokenizer(tiny_checkpoint, load_format(tiny_checkpoint))
    a = [tok.bos_id] + tok.encode(" question: Where was Gal Borin born? ")
    b = [tok.bos_id] + tok.encode(" question: Who founded Ostland? ")
    budget = len(a) + len(b) + 12  # one finished run of either (prompt + 8 sampled), not both
    engine = TransformersEngine(tiny_checkpoint, tok, device="cpu", max_parked_tokens=budget)
    first_a = generate(engine, a, 8)
    generate(engine, b, 8)  # parking it evicts a's session
    assert sum(len(s.ids) for s in engine._sessions.values()) <= budget
    before = engine.stats.reused_tokens
    generate(engine, a + first_a, 4)  # a's next round: only the shared BOS + " question:" reused
    assert engine.stats.reused_tokens - before < len(a)

    roomy = TransformersEngine(tiny_checkpoint, tok, device="cpu", max_parked_tokens=None)
    first_a = generate(roomy, a, 8)
    generate(roomy, b, 8)
    before = roomy.stats.reused_tokens
    generate(roomy, a + first_a, 4)  # a's session was kept: its whole prefix reused
    assert roomy.stats.reused_tokens - before == len(a) + len(first_a) - 1

    tiny = TransformersEngine(tiny_checkpoint, tok, device="cpu", max_parked_tokens=len(a))
    generate(tiny, a, 8)  # longer than the whole budget: not parked
    assert not tiny._sessions
    with pytest.raises(ValueError, match="max_parked_tokens"):
        TransformersEngine(tiny_checkpoint, tok, device="cpu", max_parked_tokens=-1)


def test_banned_ids_are_never_sampled(engine):
    """Guards against a ban that leaks (Retro-Search rolls out the path not taken by banning
    the token that took it): greedy picks the next-best token, sampling never draws a banned one."""
    tok = engine.tokenizer
    prompt = [tok.bos_id] + tok.encode(" question: Where was Gal Borin born? ")

    async def first(params: SamplingParams) -> int:
        ids = [i async for chunk in engine.generate(prompt, params, StopSpec()) for i in chunk.ids]
        assert len(ids) == 1
        return ids[0]

    greedy = asyncio.run(first(SamplingParams(max_tokens=1)))
    ban = frozenset({greedy})
    second = asyncio.run(first(SamplingParams(max_tokens=1, banned_ids=ban)))
    assert second != greedy
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt])).logits[0, -1]
    assert logits.topk(2).indices.tolist() == [greedy, second]
    # at a low temperature an unbanned draw is almost always the greedy token; a banned never
    unbanned = [asyncio.run(first(SamplingParams(max_tokens=1, temperature=0.3, seed=s)))
                for s in range(10)]  # fmt: skip
    assert unbanned.count(greedy) >= 5
    for seed in range(10):
        warm = SamplingParams(max_tokens=1, temperature=0.3, seed=seed, banned_ids=ban)
        assert asyncio.run(first(warm)) != greedy


def test_logit_bias_shifts_the_logits_as_openai_defines_it(engine):
    """Guards against a logit_bias that is accepted and ignored, applied to the wrong ids, or
    applied after the choice: +100 forces a token even greedily, -100 takes the greedy token
    out, a small bias moves exactly as far as the logit gap says, and a ban still wins."""
    tok = engine.tokenizer
    prompt = [tok.bos_id] + tok.encode(" question: Where was Gal Borin born? ")

    async def first(params: SamplingParams) -> int:
        ids = [i async for chunk in engine.generate(prompt, params, StopSpec()) for i in chunk.ids]
        return ids[0]

    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt])).logits[0, -1]
    greedy, second = logits.topk(2).indices.tolist()
    gap = float(logits[greedy] - logits[second])
    rare = int(logits.argmin())
    one = SamplingParams(max_tokens=1)
    assert asyncio.run(first(replace(one, logit_bias=((rare, 100.0),)))) == rare
    assert asyncio.run(first(replace(one, logit_bias=((greedy, -100.0),)))) == second
    assert asyncio.run(first(replace(one, logit_bias=((second, gap + 0.01),)))) == second
    assert asyncio.run(first(replace(one, logit_bias=((second, gap - 0.01),)))) == greedy
    banned = replace(one, logit_bias=((rare, 100.0),), banned_ids=frozenset({rare}))
    assert asyncio.run(first(banned)) == greedy


def test_reused_prefix_gives_the_same_tokens_as_a_fresh_engine(engine, tiny_checkpoint):
    """Guards against a wrongly cropped KV cache: greedy output after reuse must equal the
    output of an engine that computes the whole context from scratch."""
    tok = engine.tokenizer
    prompt = [tok.bos_id] + tok.encode(" question: In which country was Tam Osker born? ")
    first = generate(engine, prompt)
    # branch off in the middle of what was generated: the cache must be cropped, not extended
    context = prompt + first[:5] + tok.encode(" Drell")
    reused = generate(engine, context)
    fresh_engine = TransformersEngine(tiny_checkpoint, tok, device="cpu")
    assert generate(fresh_engine, context) == reused
    assert fresh_engine.stats.reused_tokens == 0


def test_stop_token_ends_the_segment(engine):
    """Guards against generating past a stop tag."""
    tok = engine.tokenizer
    prompt = [tok.bos_id] + tok.encode(" question: Where was Gal Borin born? ")
    free = generate(engine, prompt, n=20)
    stop_id = free[3]
    out = generate(engine, prompt, n=20, stop=StopSpec(frozenset({stop_id})))
    assert out == free[: free.index(stop_id) + 1]


def test_closing_the_stream_stops_work_and_frees_the_request(engine):
    """Guards against a cancelled request that keeps decoding: after aclose() no further step
    runs, and the engine serves the next request."""
    tok = engine.tokenizer
    prompt = [tok.bos_id] + tok.encode(" question: Where was Gal Borin born? ")

    async def go():
        stream = engine.generate(prompt, SamplingParams(max_tokens=100), StopSpec())
        await anext(stream)
        await anext(stream)
        decoded = engine.stats.decode_tokens
        await stream.aclose()
        await asyncio.sleep(0)
        return decoded

    decoded = asyncio.run(go())
    assert engine.stats.decode_tokens == decoded
    assert len(generate(engine, prompt, n=3)) == 3


class RecordingEngine:
    """Delegates to a real engine and records every chunk of ids it yields."""

    def __init__(self, inner):
        self.inner = inner
        self.tokenizer = inner.tokenizer
        self.sampled: list[list[int]] = []

    async def generate(self, prompt_ids, params, stop):
        segment: list[int] = []
        self.sampled.append(segment)
        async for chunk in self.inner.generate(prompt_ids, params, stop):
            segment += chunk.ids
            yield chunk


def test_real_model_trajectory_is_sampled_plus_injected(
    engine, tiny_checkpoint, small_index, known_question
):
    """Guards against trajectory/mask drift with a real model: completion ids are exactly the
    engine's sampled ids interleaved with the injected document ids, and env_mask is 0 exactly
    on the injected ones."""
    from agent.events import Documents, Finished
    from agent.loop import AgentLoop, Limits, RunParams
    from retrieval.index import load_index

    recorder = RecordingEngine(engine)
    loop = AgentLoop(recorder, load_index(small_index), load_format(tiny_checkpoint), Limits())

    async def go():
        return [e async for e in loop.run(loop.prompt_ids(known_question["question"]), RunParams())]

    events = asyncio.run(go())
    injected = [e.ids for e in events if isinstance(e, Documents)]
    traj = next(e for e in events if isinstance(e, Finished)).trajectory
    expected_ids, expected_mask = [], []
    for n, segment in enumerate(recorder.sampled):
        expected_ids += segment
        expected_mask += [1] * len(segment)
        if n < len(injected):
            expected_ids += injected[n]
            expected_mask += [0] * len(injected[n])
    assert injected, "the trained policy should search at least once"
    assert traj.completion_ids == expected_ids
    assert traj.env_mask == expected_mask


def test_concurrent_requests_share_steps_and_match_one_at_a_time(engine, tiny_checkpoint):
    """Guards against batching that changes results or does not batch: eight concurrent greedy
    requests of different lengths give the same ids as one at a time, in fewer forwards."""
    tok = engine.tokenizer
    names = ["Gal Borin", "Tam Osker", "Drell", "Velmora Tam", "Ostland", "Osker", "Borin", "Gal"]
    prompts = [[tok.bos_id] + tok.encode(f" question: Where was {n} born? ") for n in names]
    fresh = TransformersEngine(tiny_checkpoint, tok, device="cpu", max_sessions=0)
    alone = [generate(fresh, p, n=10 + i) for i, p in enumerate(prompts)]
    steps_alone = fresh.stats.decode_steps

    async def together():
        async def one(p, n):
            out = []
            async for chunk in fresh.generate(p, SamplingParams(max_tokens=n), StopSpec()):
                out += chunk.ids
            return out

        return await asyncio.gather(*(one(p, 10 + i) for i, p in enumerate(prompts)))

    assert asyncio.run(together()) == alone
    assert fresh.stats.max_batch_seen > 1
    assert fresh.stats.decode_steps - steps_alone < steps_alone / 2


def test_cancelled_request_frees_its_row_within_one_step_while_others_run(engine):
    """Guards against a disconnected client's row decoding on: closing one of three concurrent
    streams releases its row within one decode step; the other two finish normally."""
    tok = engine.tokenizer
    prompt = [tok.bos_id] + tok.encode(" question: Where was Gal Borin born? ")

    async def go():
        streams = [
            engine.generate(prompt, SamplingParams(max_tokens=60), StopSpec()) for _ in range(3)
        ]
        await asyncio.gather(*(anext(s) for s in streams))
        await anext(streams[0])
        await streams[0].aclose()
        return [[c async for c in s] for s in streams[1:]]

    rest = asyncio.run(go())
    assert engine.stats.cancel_lag_steps <= 1
    assert engine.running == 0
    assert [chunks[-1].finish_reason is not None for chunks in rest] == [True, True]


async def admitted_together(engine, calls, first=None, first_out=None):
    """Run `calls` ((prompt ids, max_tokens) pairs) so that one scheduler step admits them all:
    the scheduler is held inside a decode step of a long request (`first`'s ids, if given) until
    all of them are queued. Returns each call's ids, or the exception it raised; the long
    request's goes into the list `first_out`, if given."""
    held, hold = threading.Event(), threading.Event()
    step = engine._decode_step

    def gated_step():
        held.set()
        hold.wait()
        step()

    async def one(ids, n):
        out = []
        async for chunk in engine.generate(ids, SamplingParams(max_tokens=n), StopSpec()):
            out += chunk.ids
        return out

    engine._decode_step = gated_step
    try:
        # no BOS: shares no prefix with the calls, so it takes none of their parked sessions
        first = first or engine.tokenizer.encode(" Who founded Ostland? ")
        long = asyncio.create_task(one(first, 40))
        assert await asyncio.to_thread(held.wait, 30)  # prefilled; its first step is held
        tasks = [asyncio.create_task(one(ids, n)) for ids, n in calls]
        while engine._inbox.qsize() < len(calls):  # the held scheduler cannot take them yet
            await asyncio.sleep(0.001)
        hold.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        [long_result] = await asyncio.gather(long, return_exceptions=True)
        if first_out is not None:
            first_out.append(long_result)
        return results
    finally:
        hold.set()
        engine._decode_step = step


def test_a_row_finishing_in_batched_prefill_keeps_its_neighbours_keys(tiny_checkpoint):
    """Guards against a row that finishes at its first token while rows admitted with it are
    prefilled in the same forward: the last row moves into its slot and must take its freshly
    prefilled keys/values along (not only the ones it had before the prefill)."""
    tok = load_tokenizer(tiny_checkpoint, load_format(tiny_checkpoint))
    fresh_engine = TransformersEngine(tiny_checkpoint, tok, device="cpu", max_sessions=0)
    names = ["Gal Borin", "Tam Osker", "Drell"]
    calls = [([tok.bos_id] + tok.encode(f" question: Where was {n} born? "), 12) for n in names]
    calls[0] = (calls[0][0], 1)  # ends at its first token; the last row takes its slot
    alone = [generate(fresh_engine, ids, n) for ids, n in calls]
    assert asyncio.run(admitted_together(fresh_engine, calls)) == alone
    assert fresh_engine.stats.max_batch_seen == 4


def test_batched_prefill_padding_keeps_position_ids_within_each_row(tiny_checkpoint, tmp_path):
    """Guards against padded prefill positions running past a row's own positions, past
    max_position_embeddings when a long-reused row is batched with a long new prompt (dynamic
    RoPE rescales every row of the forward on the largest position id; learned position
    embeddings would index out of range): no position id reaches the context limit, and the
    rows give what they give alone."""
    model_dir = tmp_path / "dynamic-rope"
    shutil.copytree(tiny_checkpoint, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = 64
    rope = {**config.get("rope_parameters", {}), "rope_type": "dynamic", "factor": 4.0}
    config["rope_parameters"] = rope
    (model_dir / "config.json").write_text(json.dumps(config))
    tok = load_tokenizer(model_dir, load_format(model_dir))
    fresh_engine = TransformersEngine(model_dir, tok, device="cpu")
    reused = [tok.bos_id] + tok.encode(" question: Where was Gal Borin born? ")
    reused += generate(fresh_engine, reused, n=20)  # parked: the next call prefills one token
    fresh = ([tok.bos_id] + tok.encode(" question: Where was Tam Osker born? ") * 8)[:50]
    calls = [(reused + tok.encode(" Velmora"), 4), (fresh, 4)]
    assert max(len(ids) + n for ids, n in calls) < 64  # alone, no position reaches 64
    assert len(reused) - 1 + len(fresh) > 64  # the first row's padding would
    positions: list[int] = []
    fresh_engine._decoder.register_forward_pre_hook(
        lambda _, args, kwargs: positions.append(int(kwargs["position_ids"].max())),
        with_kwargs=True,
    )
    together = asyncio.run(admitted_together(fresh_engine, calls))
    assert max(positions) < 64
    alone_engine = TransformersEngine(model_dir, tok, device="cpu", max_sessions=0)
    assert together == [generate(alone_engine, ids, n) for ids, n in calls]


def test_a_closed_event_loop_counts_as_a_cancellation_now(engine):
    """Guards against a request whose event loop closed while the engine still emitted being
    released with a cancellation step of 0, which reported every decode step so far as the
    cancel lag."""
    tok = engine.tokenizer
    prompt = [tok.bos_id] + tok.encode(" question: Where was Gal Borin born? ")
    generate(engine, prompt, n=30)  # some decode steps before the cancellation
    loop = asyncio.new_event_loop()
    stream = engine.generate(prompt, SamplingParams(max_tokens=200), StopSpec())
    loop.run_until_complete(anext(stream))
    loop.close()  # without closing `stream`: only the engine notices, on its next chunk
    deadline = time.monotonic() + 30
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0
    assert engine.stats.cancel_lag_steps <= 1
    asyncio.run(stream.aclose())


def test_a_new_conversation_does_not_take_another_ones_parked_session(tiny_checkpoint):
    """Guards against session stealing: a new request sharing only the question template with a
    parked conversation reuses that prefix but leaves the session parked, so the conversation's
    next round still prefills only its new tokens."""
    tok = load_tokenizer(tiny_checkpoint, load_format(tiny_checkpoint))
    engine = TransformersEngine(tiny_checkpoint, tok, device="cpu")
    a = [tok.bos_id] + tok.encode(" question: Where was Gal Borin born? ")
    a += generate(engine, a, n=10)
    b = [tok.bos_id] + tok.encode(" question: Where was Tam Osker born? ")
    before = engine.stats.reused_tokens
    generate(engine, b, n=5)
    assert engine.stats.reused_tokens - before >= 3  # shared " question: Where was"
    injected = tok.encode(" (1) Gal Borin: Gal Borin was born in Velmora.")
    before = (engine.stats.prefill_tokens, engine.stats.reused_tokens)
    generate(engine, a + injected, n=5)
    assert engine.stats.prefill_tokens - before[0] == len(injected) + 1
    assert engine.stats.reused_tokens - before[1] == len(a) - 1


def long_prompt(tok, question):
    """A prompt whose first 20+ tokens are a shared system-style preamble."""
    preamble = " You answer questions about a small world. Search when unsure. Answer briefly."
    return [tok.bos_id] + tok.encode(preamble + f" question: {question} ")


def test_n_identical_prompts_admitted_together_prefill_the_prompt_once(tiny_checkpoint):
    """Guards against re-prefilling a prefix the engine already holds (a chat request with n=4
    prefilled its prompt four times): four identical greedy requests admitted in one step run
    the prompt once plus one token each for the other three, and give what they give alone."""
    tok = load_tokenizer(tiny_checkpoint, load_format(tiny_checkpoint))
    engine = TransformersEngine(tiny_checkpoint, tok, device="cpu", max_sessions=0)
    prompt = long_prompt(tok, "Where was Gal Borin born?")
    alone = [generate(engine, prompt, 12) for _ in range(4)]
    assert alone[0] == alone[3]
    first = tok.encode(" Who founded Ostland? ")  # holds the step; shares nothing (no BOS)
    before = (engine.stats.prefill_tokens, engine.stats.reused_tokens)
    together = asyncio.run(admitted_together(engine, [(prompt, 12)] * 4, first))
    assert together == alone
    assert engine.stats.prefill_tokens - before[0] == len(first) + len(prompt) + 3
    assert engine.stats.reused_tokens - before[1] == 3 * (len(prompt) - 1)


def test_a_shared_preamble_is_copied_from_running_and_co_admitted_rows(tiny_checkpoint):
    """Guards against sharing only whole prompts, or only among requests admitted together:
    requests that share a preamble with a running row and with each other run only the tokens
    after it, and give what they give alone."""
    tok = load_tokenizer(tiny_checkpoint, load_format(tiny_checkpoint))
    engine = TransformersEngine(tiny_checkpoint, tok, device="cpu", max_sessions=0)
    running = long_prompt(tok, "Who founded Ostland?")
    prompts = [long_prompt(tok, f"Where was {n} born?") for n in ["Gal Borin", "Tam Osker"]]
    # the first shares the preamble with the running row; the second more, with the first
    shared = [common(prompts[0], running), common(prompts[1], prompts[0])]
    assert 16 <= shared[0] < shared[1] < len(prompts[1]) - 1
    alone = [generate(engine, p, 10) for p in prompts]
    before = (engine.stats.prefill_tokens, engine.stats.reused_tokens)
    together = asyncio.run(admitted_together(engine, [(p, 10) for p in prompts], running))
    assert together == alone
    own = sum(len(p) - n for p, n in zip(prompts, shared, strict=True))
    assert engine.stats.prefill_tokens - before[0] == len(running) + own
    assert engine.stats.reused_tokens - before[1] == sum(shared)


def common(a, b):
    """How many first tokens `a` and `b` share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def test_a_request_failing_to_sample_fails_alone(tiny_checkpoint):
    """Guards against one request's error failing every request: a logit_bias id outside the
    vocabulary (the service rejects it; the engine is also driven directly) makes sampling
    raise for that request only, while the requests prefilled and decoded with it finish."""
    tok = load_tokenizer(tiny_checkpoint, load_format(tiny_checkpoint))
    engine = TransformersEngine(tiny_checkpoint, tok, device="cpu", max_sessions=0)
    names = ["Gal Borin", "Tam Osker", "Drell"]
    calls = [([tok.bos_id] + tok.encode(f" question: Where was {n} born? "), 8) for n in names]
    alone = [generate(engine, ids, n) for ids, n in calls]

    async def go():
        bad = SamplingParams(max_tokens=8, logit_bias=((10**7, 1.0),))
        with pytest.raises(IndexError):
            async for _ in engine.generate(calls[1][0], bad, StopSpec()):
                pass

    async def both():
        return await asyncio.gather(admitted_together(engine, calls), go())

    together, _ = asyncio.run(both())
    assert together == alone
    assert engine.running == 0


def test_a_failing_prefill_fails_only_its_request(tiny_checkpoint):
    """Guards against a prefill error failing every running and waiting request: when the
    batched prefill fails, each request is prefilled again alone and only the one that fails
    alone gets the error; the others give what they give alone."""
    tok = load_tokenizer(tiny_checkpoint, load_format(tiny_checkpoint))
    engine = TransformersEngine(tiny_checkpoint, tok, device="cpu", max_sessions=0)
    names = ["Gal Borin", "Tam Osker", "Drell"]
    calls = [([tok.bos_id] + tok.encode(f" question: Where was {n} born? "), 8) for n in names]
    alone = [generate(engine, ids, n) for ids, n in calls]
    used = {i for ids, _ in calls for i in ids} | set(tok.encode(" Who founded Ostland? "))
    marker = next(i for i in range(5, 1000) if i not in used)
    calls[1] = (calls[1][0] + [marker], 8)

    def fail_on_marker(_, args, kwargs):  # a fault only this request's prefill meets
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1 and bool((ids == marker).any()):
            raise RuntimeError("injected prefill fault")

    hook = engine._decoder.register_forward_pre_hook(fail_on_marker, with_kwargs=True)
    try:
        together = asyncio.run(admitted_together(engine, calls))
    finally:
        hook.remove()
    assert isinstance(together[1], RuntimeError)
    assert [together[0], together[2]] == [alone[0], alone[2]]
    assert engine.running == 0


def test_a_failing_prefix_copy_fails_only_the_request_that_shares(tiny_checkpoint):
    """Guards against an error while copying a shared prefix (the copy may first grow the store:
    out of memory on a GPU) escaping the step and failing every running request: only the
    request that was to share the prefix fails; the others give what they give alone."""
    tok = load_tokenizer(tiny_checkpoint, load_format(tiny_checkpoint))
    engine = TransformersEngine(tiny_checkpoint, tok, device="cpu", max_sessions=0)
    head = [tok.bos_id] + tok.encode(
        " question: Where was Gal Borin born? Who founded Ostland? Why?"
    )
    assert len(head) > 17  # the second call shares more than `_MIN_SHARE` (16) tokens of it
    calls = [(head, 8), (head + tok.encode(" Drell"), 8), (tok.encode(" Tam Osker "), 8)]
    alone = [generate(engine, ids, n) for ids, n in calls]
    copy_row = engine._store.copy_row

    def failing_copy(src, dst, length, grow=True):
        if grow:  # sharing, not a row moving to a freed slot
            raise RuntimeError("injected out of memory")
        copy_row(src, dst, length, grow)

    engine._store.copy_row = failing_copy
    try:
        together = asyncio.run(admitted_together(engine, calls))
    finally:
        engine._store.copy_row = copy_row
    assert isinstance(together[1], RuntimeError)
    assert [together[0], together[2]] == [alone[0], alone[2]]
    assert engine.running == 0


def test_admitted_requests_failing_together_leave_the_running_row_alone(tiny_checkpoint):
    """Guards against failing several admitted requests in slot order: freeing the first moved
    the last into its slot, though that row's keys/values were never grown to (its prefill had
    failed too), and the IndexError failed the running request as well."""
    tok = load_tokenizer(tiny_checkpoint, load_format(tiny_checkpoint))
    engine = TransformersEngine(tiny_checkpoint, tok, device="cpu", max_sessions=0)
    first = tok.encode(" Who founded Ostland? ")
    long_alone = generate(engine, first, 40)
    marker = next(i for i in range(5, 1000) if i not in set(first))
    # 1 running + 4 admitted rows: past the 4 rows the store first holds
    calls = [([tok.bos_id] + tok.encode(f" Where was {n} born? ") + [marker], 4)
             for n in ("Gal Borin", "Tam Osker", "Drell", "Ada Lind")]  # fmt: skip

    def fail_on_marker(_, args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1 and bool((ids == marker).any()):
            raise RuntimeError("injected prefill fault")

    hook = engine._decoder.register_forward_pre_hook(fail_on_marker, with_kwargs=True)
    first_out: list = []
    try:
        together = asyncio.run(admitted_together(engine, calls, first, first_out))
    finally:
        hook.remove()
    assert all(isinstance(r, RuntimeError) for r in together), together
    assert first_out == [long_alone] and engine.running == 0


def test_a_failing_decode_step_leaves_waiting_requests_queued(tiny_checkpoint):
    """Guards against a decode error failing requests that were only waiting for a row: the
    running rows share the failed forward and fail; a request queued behind them still runs."""
    tok = load_tokenizer(tiny_checkpoint, load_format(tiny_checkpoint))
    engine = TransformersEngine(tiny_checkpoint, tok, device="cpu", max_sessions=0, max_batch=1)
    prompt = [tok.bos_id] + tok.encode(" question: Where was Gal Borin born? ")
    alone = generate(engine, prompt, 8)
    raised: list[int] = []

    def fail_with_waiting(_, args, kwargs):  # a decode step while a request waits for a row
        if kwargs["input_ids"].shape[1] == 1 and engine._waiting and not raised:
            raised.append(1)
            raise RuntimeError("injected decode fault")

    hook = engine._decoder.register_forward_pre_hook(fail_with_waiting, with_kwargs=True)
    try:
        together = asyncio.run(admitted_together(engine, [(prompt, 8)]))
    finally:
        hook.remove()
    assert raised == [1]
    assert together == [alone]


def test_a_prompt_id_outside_the_vocabulary_is_a_value_error(engine):
    """Guards against an out-of-range prompt id reaching the embedding (on CUDA a device-side
    assert that takes the process down): it is a ValueError, and the engine serves on."""
    tok = engine.tokenizer
    prompt = [tok.bos_id] + tok.encode(" question: Where was Gal Borin born? ")
    vocab = engine.model.get_input_embeddings().num_embeddings
    for bad in (vocab, -1):
        with pytest.raises(ValueError, match=f"prompt token id {bad} is out of vocabulary"):
            generate(engine, prompt + [bad])
    assert len(generate(engine, prompt, n=3)) == 3
