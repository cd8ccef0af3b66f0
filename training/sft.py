"""SFT cold start: teach a tiny policy to think, search, read and answer, on oracle trajectories.

Run: `searchagent train sft --out artifacts/demo/sft` (or `make train-sft`).

Phases, top to bottom:
  1. worlds    — generate many small worlds (names never repeat across seeds: the policy must read,
                 it cannot memorize), each with its own BM25 index;
  2. tokenizer — byte-level BPE trained on world text, tags as single special tokens;
  3. oracle    — oracle trajectories through the real `AgentLoop` and real retrieval; the
                 trajectory's `env_mask` becomes TRL's `assistant_masks`, so injected document
                 tokens get label -100 (no loss, no gradient);
  4. warm-up   — a short span-copy phase (random token strings repeated): induction heads first,
                 so copying a name out of a document is cheap to learn;
  5. SFT       — TRL's `SFTTrainer` on the trajectories;
  6. export    — HF config + bf16 safetensors + tokenizer + `agent.json`.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from agent.checkpoint import write_agent_json
from agent.tags import DEFAULT, SPECIAL_TOKENS
from agent.tokenizer import Tokenizer
from retrieval.bm25 import BM25Retriever
from training.model import ModelSize, create_model
from training.oracle import oracle_segments, oracle_trajectory
from training.tokenizer import save_tokenizer, train_tokenizer
from training.world import (
    WorldConfig,
    generate_world,
    make_questions,
    render_corpus,
    split_questions,
)

TYPE_MIX = {"1hop": 0.45, "2hop": 0.35, "comparison": 0.20}


@dataclass(frozen=True)
class SFTConfig:
    out: Path
    init: Path | None = None  # continue from this checkpoint (its tokenizer, no warm-up)
    world_seeds: tuple[int, ...] = tuple(range(1000, 1040))
    world: WorldConfig = field(default_factory=WorldConfig)
    per_world: int = 300  # trajectories per world
    top_k: int = 3
    vocab_size: int = 2048
    size: ModelSize = field(default_factory=ModelSize)
    copy_steps: int = 300
    steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    bf16: bool = False  # CPU bf16 autocast measured ~25x slower than fp32 here
    seed: int = 0


def run_sft(cfg: SFTConfig) -> dict:
    t0 = time.monotonic()
    # 1. worlds --------------------------------------------------------------------------
    worlds = []
    for seed in tqdm(cfg.world_seeds, desc="worlds", unit="world"):
        world = generate_world(_with_seed(cfg.world, seed))
        corpus = render_corpus(world)
        train = split_questions(make_questions(world), seed)["train"]
        worlds.append((corpus, train))
    # 2. tokenizer (trained, or the initial checkpoint's) -----------------------------------
    if cfg.init is None:
        save_tokenizer(train_tokenizer(_tokenizer_texts(worlds[:8]), cfg.vocab_size), cfg.out)
    elif cfg.init.resolve() != cfg.out.resolve():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(cfg.init / name, cfg.out / name)
    tokenizer = Tokenizer.from_dir(cfg.out, eos_token=DEFAULT.eos, bos_token=DEFAULT.bos)
    # 3. oracle trajectories -------------------------------------------------------------
    rows = asyncio.run(_trajectories(worlds, tokenizer, cfg))
    # 4–5. warm-up then SFT ----------------------------------------------------------------
    if cfg.init is None:
        model = create_model(
            tokenizer.vocab_size,
            cfg.size,
            tokenizer.token_id("<|pad|>"),
            tokenizer.bos_id or 0,
            tokenizer.eos_id,
        )
        if cfg.copy_steps:
            copy_rows = _copy_rows(tokenizer, cfg.copy_steps * cfg.batch_size, cfg.seed)
            _train(model, tokenizer, copy_rows, cfg, cfg.copy_steps, "copy warm-up")
    else:
        model = _load_model(cfg.init)
    losses = _train(model, tokenizer, rows, cfg, cfg.steps, "sft")
    # 6. export ----------------------------------------------------------------------------
    export_checkpoint(model, cfg.out)
    report = {
        "trajectories": len(rows),
        "worlds": len(cfg.world_seeds),
        "final_loss": losses[-1] if losses else None,
        "seconds": round(time.monotonic() - t0, 1),
        "config": _jsonable(asdict(cfg)),
    }
    (cfg.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def export_checkpoint(model, out: Path) -> None:
    import torch

    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    model.to(torch.float32)
    write_agent_json(out, DEFAULT)


def _load_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def _with_seed(config: WorldConfig, seed: int) -> WorldConfig:
    from dataclasses import replace

    return replace(config, seed=seed)


def _tokenizer_texts(worlds: list[tuple[list[dict], list[dict]]]) -> list[str]:
    texts: list[str] = []
    for corpus, questions in worlds:
        texts += [f" {p['title']}: {p['text']}" for p in corpus]
        for q in questions[:300]:
            texts.append(DEFAULT.prompt(q["question"]))
            texts += oracle_segments(q, DEFAULT)
    return texts


def _sample_questions(questions: list[dict], n: int, rng: random.Random) -> list[dict]:
    by_type: dict[str, list[dict]] = {}
    for q in questions:
        by_type.setdefault(q["type"], []).append(q)
    picked: list[dict] = []
    for qtype, share in TYPE_MIX.items():
        pool = by_type.get(qtype, [])
        picked += rng.sample(pool, min(len(pool), round(n * share)))
    return picked


async def _trajectories(worlds, tokenizer: Tokenizer, cfg: SFTConfig) -> list[dict]:
    rng = random.Random(cfg.seed)
    rows: list[dict] = []
    dropped = 0
    bar = tqdm(total=len(worlds) * cfg.per_world, desc="oracle trajectories", unit="traj")
    for corpus, train in worlds:
        retriever = BM25Retriever.build(corpus)
        for q in _sample_questions(train, cfg.per_world, rng):
            traj = await oracle_trajectory(q, tokenizer, retriever, DEFAULT, cfg.top_k)
            bar.update(1)
            if traj is None:
                dropped += 1
                continue
            rows.append(
                {
                    "input_ids": traj.prompt_ids + traj.completion_ids,
                    "assistant_masks": [0] * len(traj.prompt_ids) + traj.env_mask,
                }
            )
    bar.close()
    print(f"oracle: {len(rows)} trajectories, {dropped} dropped (retrieval missed a fact)")
    return rows


def _copy_rows(tokenizer: Tokenizer, n: int, seed: int) -> list[dict]:
    """Random token strings shown twice; loss only on the second copy."""
    rng = random.Random(seed)
    first = len(SPECIAL_TOKENS)
    rows = []
    for _ in range(n):
        span = [rng.randrange(first, tokenizer.vocab_size) for _ in range(rng.randint(4, 24))]
        bos = [tokenizer.bos_id or 0]
        rows.append(
            {
                "input_ids": bos + span + span,
                "assistant_masks": [0] * (1 + len(span)) + [1] * len(span),
            }
        )
    return rows


def _train(model, tokenizer: Tokenizer, rows: list[dict], cfg: SFTConfig, steps: int, name: str):
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    processing = PreTrainedTokenizerFast.from_pretrained(str(cfg.out))
    args = TRLConfig(
        output_dir=str(cfg.out / f".{name.replace(' ', '-')}"),
        max_steps=steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        logging_steps=max(1, steps // 20),
        save_strategy="no",
        report_to="none",
        bf16=cfg.bf16,
        use_cpu=not _cuda(),
        gradient_checkpointing=False,
        max_length=None,
        dataloader_num_workers=0,
        seed=cfg.seed,
        run_name=name,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=processing,
    )
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
