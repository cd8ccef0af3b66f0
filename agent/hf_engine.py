"""`TransformersEngine`: the embedded in-process engine (CPU, or CUDA when present).

Every decode step runs on one dedicated worker thread, so concurrent requests interleave step
by step without blocking the event loop. Each request owns a `DynamicCache`; when a request ends
its cache is parked as a *session* keyed by the ids it covers. The next call whose context
starts with those ids (the same conversation after documents were injected) takes the session,
crops it to the common prefix and prefills only the new tokens — the prefix is never re-run.

Batching concurrent requests into one forward pass is the engine issue's work; this engine is
correct and prefix-reusing, one row per forward.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from agent.engine import SamplingParams, StopSpec, TokenChunk
from agent.tokenizer import Tokenizer


@dataclass
class EngineStats:
    prefill_tokens: int = 0  # tokens run through the model as (part of) a prompt
    reused_tokens: int = 0  # prompt tokens served from a parked session instead
    decode_tokens: int = 0


@dataclass
class _Session:
    ids: list[int]  # the tokens whose keys/values `cache` holds
    cache: DynamicCache


class TransformersEngine:
    def __init__(
        self,
        model_dir: str | Path,
        tokenizer: Tokenizer,
        device: str | None = None,
        max_sessions: int = 32,
    ) -> None:
        self.tokenizer = tokenizer
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        self.model.to(self.device).eval()
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.stats = EngineStats()
        self._sessions: OrderedDict[int, _Session] = OrderedDict()
        self._next_session = 0
        self._max_sessions = max_sessions
        self._lock = threading.Lock()  # guards _sessions; steps themselves run on one thread
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, stop: StopSpec
    ) -> AsyncIterator[TokenChunk]:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) >= self.max_context:
            raise ValueError(f"context of {len(prompt_ids)} tokens exceeds {self.max_context}")
        loop = asyncio.get_running_loop()
        gen = _generator(params.seed)
        session, logits = await loop.run_in_executor(self._worker, self._prefill, prompt_ids)
        produced = 0
        try:
            while True:
                token = _sample(logits, params, gen)
                produced += 1
                if token in stop.token_ids or token == self.tokenizer.eos_id:
                    yield TokenChunk([token], "stop", token)
                    return
                limit = produced >= params.max_tokens or len(session.ids) + 1 >= self.max_context
                if limit:
                    yield TokenChunk([token], "length")
                    return
                yield TokenChunk([token])
                logits = await loop.run_in_executor(self._worker, self._step, session, token)
        finally:
            self._park(session)

    # -- worker-thread side -------------------------------------------------------------

    @torch.inference_mode()
    def _prefill(self, prompt_ids: list[int]) -> tuple[_Session, torch.Tensor]:
        session = self._take_session(prompt_ids)
        new = prompt_ids[len(session.ids) :]
        self.stats.prefill_tokens += len(new)
        self.stats.reused_tokens += len(session.ids)
        return session, self._forward(session, new)

    @torch.inference_mode()
    def _step(self, session: _Session, token: int) -> torch.Tensor:
        self.stats.decode_tokens += 1
        return self._forward(session, [token])

    def _forward(self, session: _Session, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], device=self.device)  # (1, T)
        out = self.model(input_ids=x, past_key_values=session.cache, use_cache=True)
        session.ids.extend(ids)
        return out.logits[0, -1].float()  # (V,)

    def _take_session(self, prompt_ids: list[int]) -> _Session:
        """The parked session sharing the longest prefix with `prompt_ids`, cropped to it (at
        least one prompt token is left to run, since its logits pick the next token)."""
        with self._lock:
            best_key, best_len = None, 0
            for key, s in self._sessions.items():
                n = _common_prefix(s.ids, prompt_ids, len(prompt_ids) - 1)
                if n > best_len:
                    best_key, best_len = key, n
            if best_key is None:
                return _Session([], DynamicCache(config=self.model.config))
            session = self._sessions.pop(best_key)
        if len(session.ids) > best_len:
            session.cache.crop(best_len - len(session.ids))
            del session.ids[best_len:]
        return session

    def _park(self, session: _Session) -> None:
        with self._lock:
            self._sessions[self._next_session] = session
            self._next_session += 1
            while len(self._sessions) > self._max_sessions:
                self._sessions.popitem(last=False)


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator().manual_seed(seed)


def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
