"""`TransformersEngine`: the embedded in-process engine (CPU, or CUDA when present).

A scheduler thread owns the model. Concurrent requests are *rows* of one key/value store
(`agent.kv_slots`: per layer a (slots, heads, capacity, head_dim) tensor, rows left-aligned),
and every decode step is one batched forward over all running rows: each row feeds its last
sampled token at its own position, and a per-row mask hides the columns it does not own. New
requests (and continuations) are admitted between steps: their new tokens are prefilled
together, padded, into free rows, and they join the next decode step. Nothing is re-packed per
step; only a row that leaves is moved (the last row takes its slot), costing one row's copy.

When a request ends, its row's keys/values are parked as a *session* keyed by the ids they cover.
The next request whose context starts with those ids (the same conversation after documents were
injected) copies the session back and prefills only the new tokens: the prefix is never re-run.
Prefixes held by live rows are shared the same way: a request admitted while a running row (or
one admitted in the same step: the n choices of one chat request, one system prompt for many
users) holds 16 or more of its first tokens copies that row's keys/values for them.

Why an own scheduler and not transformers' `ContinuousBatchingManager`: see BENCHMARKS.md
("Engine: batching"). In short, the loop needs token-exact continuations from parked sessions,
stop strings over incremental detokenization and cancellation within one step, and this engine
does all three with plain `model(...)` calls on any causal LM with a standard KV cache.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import Cache

from agent.engine import SamplingParams, StopSpec, StopStrings, TokenChunk
from agent.kv_slots import Plan, SlotKV, SlotLayer
from agent.tokenizer import Tokenizer


@dataclass
class EngineStats:
    prefill_tokens: int = 0  # tokens run through the model as (part of) a prompt
    reused_tokens: int = 0  # prompt tokens served from a parked session instead
    decode_tokens: int = 0  # tokens fed by batched decode steps (one per row per step)
    decode_steps: int = 0  # batched forwards; decode_tokens / decode_steps = mean batch size
    max_batch_seen: int = 0
    cancel_lag_steps: int = 0  # most decode steps a cancelled request kept its row afterwards


@dataclass
class _Session:
    ids: list[int]  # the tokens whose keys/values `kv` holds
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (heads, len(ids), head_dim)


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    stop: StopSpec
    strings: StopStrings
    generator: torch.Generator | None
    loop: asyncio.AbstractEventLoop  # the caller's; chunks are handed over through it
    out: asyncio.Queue[TokenChunk | BaseException]
    ids: list[int] = field(default_factory=list)  # tokens whose keys/values the row holds
    pending: int | None = None  # sampled, not yet fed
    produced: int = 0
    slot: int = -1
    cancelled: bool = False
    cancelled_at_step: int = 0
    done: bool = False
    error: Exception | None = None  # its prefill failed; it fails once the step's forwards ran


class TransformersEngine:
    def __init__(
        self,
        model_dir: str | Path | None,
        tokenizer: Tokenizer,
        device: str | None = None,
        max_sessions: int = 32,
        max_batch: int = 32,
        max_parked_tokens: int | None = 65_536,
        dtype: torch.dtype | None = None,
        model: torch.nn.Module | None = None,
    ) -> None:
        """Loads `model_dir`, or decodes with `model`, a causal LM already in memory (RL
        training: the live policy, whose weights change between rollouts — call `invalidate`
        after each update). Such a model stays where and as it is (device, dtype, mode).

        Finished rows are parked (their keys/values kept for the conversation's next round), at
        most `max_sessions` of them holding at most `max_parked_tokens` tokens in all (None: no
        token bound), least recently used evicted first: parked keys/values cost memory per
        token (a 7B Qwen2.5 in bf16: 56 KiB a token, 3.5 GiB for the default 65,536)."""
        if max_parked_tokens is not None and max_parked_tokens < 0:
            raise ValueError(f"max_parked_tokens must be >= 0 or None, got {max_parked_tokens}")
        self.tokenizer = tokenizer
        if model is not None:
            self.model = model
            self.device = next(model.parameters()).device
        else:
            if model_dir is None:
                raise ValueError("TransformersEngine needs a model directory or a model")
            self.device = _device(device)
            if dtype is None:
                cuda_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
                dtype = torch.bfloat16 if cuda_bf16 else torch.float32
            try:
                self.model = AutoModelForCausalLM.from_pretrained(
                    str(model_dir), dtype=dtype, attn_implementation="sdpa"
                )
            except Exception as exc:  # OSError, SafetensorError, JSON errors: all the files' fault
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ValueError(f"cannot load a model from {model_dir}: {reason}") from exc
            self.model.to(self.device).eval()
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self._vocab = int(self.model.get_input_embeddings().num_embeddings)
        self.max_batch = max_batch
        self.stats = EngineStats()
        self._sessions: OrderedDict[int, _Session] = OrderedDict()
        self._next_session = 0
        self._max_sessions = max_sessions
        self._max_parked_tokens = max_parked_tokens
        n_layers = self.model.config.num_hidden_layers
        self._plan = Plan()
        self._store = SlotKV(n_layers, self.device)
        self._cache = Cache(layers=[SlotLayer(self._plan, self._store, i) for i in range(n_layers)])
        self._rows: list[_Request] = []  # running requests; row i lives in slot i
        self._inbox: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._waiting: list[_Request] = []
        self._outbox: list[tuple[_Request, TokenChunk | BaseException]] = []
        self._decoder = self.model.get_decoder()
        self._head = self.model.get_output_embeddings()
        self._stale = False  # set by `invalidate`
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def invalidate(self) -> None:
        """The weights changed: parked sessions hold keys/values of the old ones, so none may be
        reused. Dropped by the scheduler before it admits anything new."""
        self._stale = True
        self._inbox.put(None)

    @property
    def running(self) -> int:
        """Requests holding a row right now (admitted and not yet finished or cancelled)."""
        return len(self._rows)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, stop: StopSpec
    ) -> AsyncIterator[TokenChunk]:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) >= self.max_context:
            raise ValueError(f"context of {len(prompt_ids)} tokens exceeds {self.max_context}")
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if (bad := next((i for i in prompt_ids if not 0 <= i < self._vocab), None)) is not None:
            # checked here: on CUDA an embedding lookup out of range kills the whole process
            raise ValueError(f"prompt token id {bad} is out of vocabulary (0..{self._vocab - 1})")
        out: asyncio.Queue[TokenChunk | BaseException] = asyncio.Queue()
        req = _Request(
            prompt=list(prompt_ids),
            params=params,
            stop=stop,
            strings=StopStrings(self.tokenizer, stop.strings),
            generator=_generator(params.seed),
            loop=asyncio.get_running_loop(),
            out=out,
        )
        self._inbox.put(req)
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not req.done:
                req.cancelled_at_step = self.stats.decode_steps
                req.cancelled = True
                self._inbox.put(None)  # wake the scheduler if it is idle

    # -- scheduler thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            block = not self._rows and not self._waiting
            try:
                item = self._inbox.get(block=block)
                while True:
                    if item is not None:
                        self._waiting.append(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            if self._stale:
                self._stale = False
                self._sessions.clear()
            try:
                self._schedule()
            except Exception as exc:  # a decode forward is every row's: all running rows fail
                for req in self._rows:  # (waiting requests stay queued), never the thread
                    req.done, req.slot = True, -1
                    self._outbox.append((req, exc))
                self._rows = []
            self._deliver()

    def _deliver(self) -> None:
        """Hand this step's chunks to their callers: one wake-up per event loop, not per row."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Any]]] = {}
        for req, item in self._outbox:
            by_loop.setdefault(req.loop, []).append((req, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                for req, _ in items:
                    req.cancelled_at_step = self.stats.decode_steps
                    req.cancelled = True

    @torch.inference_mode()
    def _schedule(self) -> None:
        for req in [r for r in self._rows if r.cancelled]:
            self._release(req)
        self._waiting = [r for r in self._waiting if not r.cancelled]
        running = list(self._rows)
        admitted: list[_Request] = []
        while self._waiting and len(self._rows) < self.max_batch:
            req = self._waiting.pop(0)
            try:
                admitted.append(self._admit(req))
            except Exception as exc:  # writing its parked session (out of memory): its own failure
                self._fail(req, exc)
        self._prefill_all(running, admitted)
        if self._rows:
            self._decode_step()

    def _admit(self, req: _Request) -> _Request:
        """Give `req` a row (the next slot) holding the best parked session's keys/values."""
        req.slot = len(self._rows)
        self._rows.append(req)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(self._rows))
        self._store.reserve(len(self._rows), len(req.prompt) + 1)
        session = self._take_session(req.prompt)
        if session is not None:
            self._store.write_row(req.slot, session.kv, len(session.ids))
            req.ids = session.ids
        self.stats.prefill_tokens += len(req.prompt) - len(req.ids)
        self.stats.reused_tokens += len(req.ids)
        return req

    def _prefill_all(self, running: list[_Request], admitted: list[_Request]) -> None:
        """Prefill `admitted`, each sharing the longest prefix held by a running row or by a
        request admitted before it (n=4 choices, one system prompt for many users): that prefix
        is copied, not re-run. Requests sharing with one admitted now (followers) are prefilled
        after it. Every forward comes before any row samples (which may release a row and move
        another), so rows stay where `_admit` put them; a failed prefill fails only its request."""
        leaders: list[_Request] = []
        followers: list[tuple[_Request, _Request, int]] = []
        for req in admitted:
            donor, n = self._donor(req, running, leaders)
            if donor is None or donor.slot < len(running):  # running rows hold slots 0..
                if donor is not None:
                    self._share(req, donor, n)
                leaders.append(req)
            else:
                followers.append((req, donor, n))
        ready = [req for req in leaders if req.error is None]
        sampled = [x for g in _prefill_groups(ready) for x in self._prefill_isolated(g)]
        for req, donor, n in followers:
            if donor.error is None:
                self._share(req, donor, n)
        later = _prefill_groups([req for req, _, _ in followers if req.error is None])
        sampled += [x for g in later for x in self._prefill_isolated(g)]
        # last slot first: a failed row is then the last, and no row whose layers may not have
        # grown to its slot (its prefill failed too) is moved into a freed one
        for req in sorted(admitted, key=lambda r: r.slot, reverse=True):
            if req.error is not None:
                self._fail(req, req.error)
        for req, logits in sampled:
            self._accept(req, logits)

    def _donor(
        self, req: _Request, running: list[_Request], leaders: list[_Request]
    ) -> tuple[_Request | None, int]:
        """The row holding the longest prefix of `req.prompt` (and its length), if that is at
        least `_MIN_SHARE` tokens more than `req` holds already: a running row (its `ids`) or a
        leader admitted in this step (its `prompt`, once prefilled). At least one prompt token is
        left to run, since its logits pick the next token."""
        best: _Request | None = None
        best_n = len(req.ids) + _MIN_SHARE - 1
        limit = len(req.prompt) - 1
        for other, ids in [(r, r.ids) for r in running] + [(r, r.prompt) for r in leaders]:
            n = _common_prefix(ids, req.prompt, limit)
            if n > best_n:
                best, best_n = other, n
        return best, best_n

    def _share(self, req: _Request, donor: _Request, n: int) -> None:
        """Copy `donor`'s keys/values of the first `n` prompt tokens into `req`'s row. The copy
        may first grow the store (as `_admit` reserved it): out of memory there is `req`'s own
        failure (its `error`), as it would be in its prefill, not every running row's."""
        try:
            self._store.copy_row(donor.slot, req.slot, n)
        except Exception as exc:
            req.error = exc
            return
        gained = n - len(req.ids)
        req.ids = req.prompt[:n]
        self.stats.prefill_tokens -= gained
        self.stats.reused_tokens += gained

    def _prefill_isolated(self, group: list[_Request]) -> list[tuple[_Request, torch.Tensor]]:
        """`_prefill` of `group`, paired with each row's logits. When it fails, each row runs
        again alone: the failure is pinned (in `error`) on the request that fails alone."""
        try:
            return list(zip(group, self._prefill(group), strict=True))
        except Exception as exc:
            if len(group) == 1:
                group[0].error = exc
                return []
        return [x for req in group for x in self._prefill_isolated([req])]

    def _prefill(self, group: list[_Request]) -> torch.Tensor:
        """One forward over the new tokens of `group` (consecutive rows), padded to the longest:
        the logits (rows, vocab) at each row's last token."""
        starts = [len(r.ids) for r in group]
        news = [r.prompt[len(r.ids) :] for r in group]
        q = max(len(n) for n in news)
        kv_len = max(starts) + q
        self._store.reserve(len(self._rows), kv_len + 1)
        self._plan.row0, self._plan.starts, self._plan.kv_len = group[0].slot, starts, kv_len
        pad = self.tokenizer.eos_id
        x = torch.tensor([n + [pad] * (q - len(n)) for n in news], device=self.device)
        offsets = torch.arange(q, device=self.device)
        start_t = torch.tensor(starts, device=self.device)
        last = torch.tensor([len(n) - 1 for n in news], device=self.device)
        # padding repeats the row's last real position: a row's position ids never exceed what
        # it would use alone (max_position_embeddings, dynamic/long RoPE switch on the maximum)
        positions = start_t[:, None] + torch.minimum(offsets[None, :], last[:, None])  # (rows, q)
        cols = torch.arange(kv_len, device=self.device)
        mask = (cols[None, None, :] <= positions[:, :, None])[:, None]  # (rows, 1, q, kv_len)
        try:
            logits = self._forward(x, positions, mask, last)
        finally:
            self._plan.starts = []
        for req, new in zip(group, news, strict=True):
            req.ids = req.ids + new
        return logits

    def _decode_step(self) -> None:
        rows = self._rows
        n = len(rows)
        lengths = torch.tensor([len(r.ids) for r in rows], device=self.device)
        kv_len = int(lengths.max()) + 1
        self._store.reserve(n, kv_len)
        self._plan.batch, self._plan.positions, self._plan.kv_len = n, lengths, kv_len
        x = torch.tensor([[r.pending] for r in rows], device=self.device)
        cols = torch.arange(kv_len, device=self.device)
        mask = (cols[None, :] <= lengths[:, None])[:, None, None, :]  # (n, 1, 1, kv_len)
        first = torch.zeros(n, dtype=torch.long, device=self.device)
        logits = self._forward(x, lengths[:, None], mask, first)
        self.stats.decode_steps += 1
        self.stats.decode_tokens += n
        for req in rows:
            assert req.pending is not None
            req.ids.append(req.pending)
        for req, row_logits in zip(list(rows), logits, strict=True):
            self._accept(req, row_logits)

    def _forward(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, last: torch.Tensor
    ) -> torch.Tensor:
        """Logits (rows, vocab) at position `last[i]` of each row; the LM head runs only there."""
        hidden = self._decoder(
            input_ids=x,
            position_ids=positions,
            attention_mask=mask,
            past_key_values=self._cache,
            use_cache=True,
        ).last_hidden_state
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self._head(picked).float()

    def _accept(self, req: _Request, logits: torch.Tensor) -> None:
        """Sample the row's next token and queue it for its caller; release a finished row. A
        failure here (sampling, detokenizing) is this request's alone: only it fails."""
        if req.cancelled:
            self._release(req)
            return
        try:
            chunk = self._next_chunk(req, logits)
        except Exception as exc:
            self._fail(req, exc)
            return
        if chunk.finish_reason is None:
            req.pending = chunk.ids[0]
        else:
            req.done = True
            self._release(req)  # before the last chunk: a caller that saw it sees the row free
        self._outbox.append((req, chunk))

    def _next_chunk(self, req: _Request, logits: torch.Tensor) -> TokenChunk:
        token = _sample(logits, req.params, req.generator)
        req.produced += 1
        if token in req.stop.token_ids or token in self.tokenizer.stop_ids:
            return TokenChunk([token], "stop", token)
        if (found := req.strings.push([token])) is not None:
            return TokenChunk([token], "stop", stop_str=found)
        if req.produced >= req.params.max_tokens or len(req.ids) + 1 >= self.max_context:
            return TokenChunk([token], "length")
        return TokenChunk([token])

    def _fail(self, req: _Request, exc: Exception) -> None:
        """End `req` with `exc`; its row is not parked (a failed forward leaves it half written)."""
        req.done = True
        req.ids = []
        self._release(req)
        self._outbox.append((req, exc))

    def _release(self, req: _Request) -> None:
        """Park the row's keys/values as a session and give its slot to the last row."""
        slot = req.slot
        if slot < 0:
            return
        if req.cancelled:
            lag = self.stats.decode_steps - req.cancelled_at_step
            self.stats.cancel_lag_steps = max(self.stats.cancel_lag_steps, lag)
        budget = self._max_parked_tokens  # a longer row would evict all and still not fit
        if req.ids and self._max_sessions > 0 and (budget is None or len(req.ids) <= budget):
            self._park(_Session(list(req.ids), self._store.read_row(slot, len(req.ids))))
        last = self._rows.pop()
        if last is not req:
            self._store.copy_row(last.slot, slot, len(last.ids), grow=False)
            last.slot = slot
            self._rows[slot] = last
        req.slot = -1

    # -- sessions -----------------------------------------------------------------------

    def _take_session(self, prompt_ids: list[int]) -> _Session | None:
        """The parked session sharing the longest prefix with `prompt_ids`, cropped to it (at
        least one prompt token is left to run, since its logits pick the next token).

        A session that `prompt_ids` continues as a whole is taken out (this is its conversation's
        next round); one that only shares a beginning with it (a system prompt, the same question
        template) stays parked for its own conversation — its tensors are only read."""
        best_key, best_len = None, 0
        for key, s in self._sessions.items():
            n = _common_prefix(s.ids, prompt_ids, len(prompt_ids) - 1)
            if n > best_len:
                best_key, best_len = key, n
        if best_key is None:
            return None
        session = self._sessions[best_key]
        if best_len == len(session.ids):
            del self._sessions[best_key]
        else:
            self._sessions.move_to_end(best_key)  # recently useful: evicted last
        return _Session(session.ids[:best_len], session.kv)

    def _park(self, session: _Session) -> None:
        budget = self._max_parked_tokens
        self._sessions[self._next_session] = session
        self._next_session += 1
        parked = sum(len(s.ids) for s in self._sessions.values())
        while len(self._sessions) > self._max_sessions or (budget is not None and parked > budget):
            _, evicted = self._sessions.popitem(last=False)
            parked -= len(evicted.ids)


def _device(name: str | None) -> torch.device:
    """The device to run on (CUDA when present and none is named); ValueError for a name torch
    does not know, or CUDA where this torch has none."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r} (cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this torch build or machine has no CUDA")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def _put_all(items: list[tuple[_Request, Any]]) -> None:
    for req, item in items:
        req.out.put_nowait(item)


def _prefill_groups(reqs: list[_Request]) -> list[list[_Request]]:
    """Split admitted rows into prefill batches of consecutive slots whose padding stays small:
    a group grows while (rows x longest) <= 1.25 x its real tokens + 64."""
    groups: list[list[_Request]] = []
    for req in reqs:
        n = len(req.prompt) - len(req.ids)
        if groups and groups[-1][-1].slot + 1 == req.slot:
            g = groups[-1]
            sizes = [len(r.prompt) - len(r.ids) for r in g] + [n]
            if len(sizes) * max(sizes) <= 1.25 * sum(sizes) + 64:
                g.append(req)
                continue
        groups.append([req])
    return groups


_MIN_SHARE = 16  # fewer shared tokens are cheaper to prefill again than to copy a row for


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


_GREEDY_BELOW = 1e-5  # as vLLM: a smaller temperature is greedy (dividing by it overflows fp32)


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator().manual_seed(seed % 2**64)  # torch takes [0, 2**64); any int works


def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    if params.logit_bias or params.banned_ids:
        logits = logits.clone()
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias, strict=True)
        logits[list(ids)] += torch.tensor(bias, dtype=logits.dtype, device=logits.device)
    if params.banned_ids:
        logits[sorted(params.banned_ids)] = float("-inf")
    if params.temperature < _GREEDY_BELOW:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.cpu().float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        keep[0] = True  # the most likely token always stays, however small top_p is
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
