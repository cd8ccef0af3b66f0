"""SFT cold start: teach a tiny policy to think, search, read and answer, on oracle trajectories.

Run: `searchagent train sft --out artifacts/demo/sft` (or `make train-sft`).

Phases, top to bottom:
  1. worlds    — generate many small worlds (names never repeat across seeds: the policy must read,
                 it cannot memorize), each with its own BM25 index;
  2. tokenizer — byte-level BPE trained on world text, tags as single special tokens;
  3. oracle    — oracle trajectories through the real `AgentLoop` and real retrieval; the
                 trajectory's `env_mask` becomes TRL's `assistant_masks`, so injected document
                 tokens get label -100 (no loss, no gradient);
  4. warm-up   — a span-copy phase (random token strings repeated) until the induction phase
                 change (see `_copy_rows`), so copying a name is a skill the model already has;
  5. SFT       — TRL's `SFTTrainer` on the trajectories;
  6. export    — HF config + bf16 safetensors + tokenizer + `agent.json`.

`format` picks the tag preset the oracle speaks (its tags, prompt template and document rendering,
exactly as the loop serves them) and the one `agent.json` names; continuing an `init` checkpoint
keeps its format, and retraining it in another takes `switch_format` (see `training_format`).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from agent.checkpoint import AGENT_FILE, load_format, load_tokenizer, write_agent_json
from agent.events import Trajectory
from agent.tags import DEFAULT, SPECIAL_TOKENS, TagFormat, get_format
from agent.tokenizer import Tokenizer, read_chat_template
from retrieval.bm25 import BM25Retriever
from retrieval.outputs import staged_dir
from training.model import ModelSize, create_model, no_activation_checkpointing
from training.oracle import Waste, oracle_segments, oracle_trajectory
from training.tokenizer import DEMO_CHAT_TEMPLATE, save_tokenizer, train_tokenizer
from training.world import (
    WorldConfig,
    generate_world,
    load_world,
    make_questions,
    read_jsonl,
    render_corpus,
    split_questions,
    well_known,
)

TYPE_MIX = {"1hop": 0.55, "2hop": 0.30, "comparison": 0.15}


@dataclass(frozen=True)
class SFTConfig:
    out: Path
    init: Path | None = None  # continue from this checkpoint (its tokenizer, no warm-up)
    keep_layers: tuple[int, ...] | None = None  # of init's layers: a smaller model (see shrink)
    data: Path | None = None  # train on this distillation jsonl (retro) instead of the oracle
    # R1-Searcher++'s cold start on this world (a `build_world` directory) instead of the oracle
    # on generated worlds: see `_knowledge_rows`
    knowledge: Path | None = None
    min_mentions: int = 5  # a fact stated this often in the corpus is recalled, not searched
    recall_repeats: int = 16  # copies of each trajectory that recalls a fact
    corpus_epochs: int = 1  # copies of each corpus passage as a language-model row
    waste: Waste = field(default_factory=Waste)  # wasteful oracle traces (demo policies)
    world_seeds: tuple[int, ...] = tuple(range(1000, 1040))
    world: WorldConfig = field(default_factory=WorldConfig)
    per_world: int = 300  # trajectories per world
    top_k: int = 3
    vocab_size: int = 2048
    size: ModelSize = field(default_factory=ModelSize)
    copy_steps: int = 1500  # at most: the warm-up stops once copy accuracy reaches copy_target
    copy_batch_size: int = 64
    copy_target: float = 0.85
    steps: int = 500
    batch_size: int = 16
    lr: float = 1e-3
    bf16: bool = False  # CPU bf16 autocast measured ~25x slower than fp32 here
    seed: int = 0
    format: str | None = None  # tag preset; None: init's (agent.json), else `default`
    switch_format: bool = False  # allow `format` to differ from init's (retrain its tags)


def check_number(name: str, value: object, *, positive: bool, finite: bool = True) -> None:
    """Refuse a setting that is not a real number >= 0 (> 0 when `positive`), or not finite when
    `finite`. A learning rate of inf or nan trains every weight to NaN and one of 0 trains
    nothing, both with exit 0 and a checkpoint written; a negative loss weight rewards the
    opposite of what it is for; `finite=False` is for seconds, where inf means no limit."""
    real = isinstance(value, int | float) and not isinstance(value, bool)
    if not real or not (value > 0 if positive else value >= 0) or (finite and value == math.inf):
        what = "a finite number" if finite else "seconds"
        raise ValueError(f"{name} must be {what} {'> 0' if positive else '>= 0'}, not {value!r}")


def training_format(
    init: Path | None, requested: str | None, *, switch: bool = False, hint: str = ""
) -> TagFormat | None:
    """The tag format a run on `init` trains in: the `requested` preset, else the one `init`'s
    agent.json names; None when neither says. A `requested` preset other than `init`'s is refused
    (ValueError, one line, ending in `hint`) unless `switch`: SFT can teach a policy new tags,
    but RL on a policy that samples another format's tags earns no reward at all."""
    fmt = get_format(requested) if requested else None  # unknown preset: ValueError naming them
    if init is None or not (init / AGENT_FILE).is_file():
        return fmt
    trained = load_format(init)
    if fmt is None or fmt.name == trained.name:
        return trained  # its own fields win over the preset's, as at serving
    if not switch:
        raise ValueError(
            f"{init} was trained in tag format {trained.name!r} (its agent.json), not "
            f"{fmt.name!r}: a policy samples the tags it was trained on{hint}"
        )
    return fmt


def run_sft(cfg: SFTConfig) -> dict:
    """Train and export the checkpoint into `cfg.out`: a new or empty directory, or an earlier
    checkpoint, which the new one replaces only once it is complete (`staged_dir`): a failure or
    Ctrl-C part-way leaves `cfg.out` as it was, never new tokenizer files beside old weights."""
    if (cfg.data or cfg.knowledge) is not None and cfg.init is None:
        raise ValueError("data and knowledge fine-tune a checkpoint: they need init")
    check_number("lr", cfg.lr, positive=True)
    hint = ": set switch_format (--switch-format) to retrain it in another"
    fmt = training_format(cfg.init, cfg.format, switch=cfg.switch_format, hint=hint) or DEFAULT
    if fmt.chat and cfg.init is not None and read_chat_template(cfg.init) is None:
        raise ValueError(
            f"tag format {fmt.name!r} is a chat format; {cfg.init} has no chat template"
        )
    with staged_dir(cfg.out, "config.json", "checkpoint") as work:
        report = _run_sft(replace(cfg, out=work), fmt)
        report["config"]["out"] = str(cfg.out)
        (work / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _run_sft(cfg: SFTConfig, fmt: TagFormat) -> dict:
    t0 = time.monotonic()
    own_rows = cfg.data is not None or cfg.knowledge is not None  # no generated worlds
    # 1. worlds --------------------------------------------------------------------------
    worlds = []
    for seed in tqdm(() if own_rows else cfg.world_seeds, desc="worlds", unit="world"):
        world = generate_world(_with_seed(cfg.world, seed))
        corpus = render_corpus(world)
        train = split_questions(make_questions(world), seed)["train"]
        worlds.append((corpus, train))
    # 2. tokenizer (trained, or the initial checkpoint's) -----------------------------------
    if cfg.init is None:
        tok = train_tokenizer(_tokenizer_texts(worlds[:8], fmt), cfg.vocab_size)
        save_tokenizer(tok, cfg.out, DEMO_CHAT_TEMPLATE if fmt.chat else None)
    elif cfg.init.resolve() != cfg.out.resolve():
        copy_tokenizer_files(cfg.init, cfg.out)
    if cfg.init is None:
        tokenizer = Tokenizer.from_dir(cfg.out, eos_token=DEFAULT.eos, bos_token=DEFAULT.bos)
        # the trajectories' own: the format's BOS (or none) and EOS, as `serve` will load the
        # checkpoint (an EOS string the vocabulary lacks, like r1-searcher's Qwen one: ours)
        speaker = Tokenizer.from_dir(cfg.out, fmt.eos, fmt.bos, extra_eos=[tokenizer.eos_id])
    else:  # the checkpoint's, as `serve` loads it: a Qwen has neither <|eos|> nor <|bos|>
        tokenizer = speaker = load_tokenizer(cfg.init, fmt)
    # 3. oracle trajectories, or a distillation dataset -----------------------------------
    if cfg.data is not None:
        rows = read_distillation(cfg.data, tokenizer.vocab_size)
    elif cfg.knowledge is not None:
        rows = asyncio.run(_knowledge_rows(cfg.knowledge, speaker, cfg, fmt))
    else:
        rows = asyncio.run(_trajectories(worlds, speaker, cfg, fmt))
    # 4–5. warm-up then SFT ----------------------------------------------------------------
    if cfg.init is None:
        model = create_model(
            tokenizer.vocab_size,
            cfg.size,
            tokenizer.token_id("<|pad|>"),
            tokenizer.bos_id or 0,
            tokenizer.eos_id,
            cfg.seed,
        )
        if cfg.copy_steps:
            copy_rows = _copy_rows(tokenizer, cfg.copy_steps * cfg.copy_batch_size, cfg.seed)
            _train(
                model, tokenizer, copy_rows, cfg, cfg.copy_steps, "copy warm-up",
                batch_size=cfg.copy_batch_size, schedule="constant_with_warmup",
                stop_at_accuracy=cfg.copy_target,
            )  # fmt: skip
    else:
        model = _load_model(cfg.init)
        if cfg.keep_layers is not None:
            shrink(model, cfg.keep_layers)
    losses = _train(model, tokenizer, rows, cfg, cfg.steps, "sft")
    # 6. export ----------------------------------------------------------------------------
    export_checkpoint(model, cfg.out, fmt)
    report = {
        "trajectories": len(rows),
        "worlds": 1 if cfg.knowledge else 0 if cfg.data else len(cfg.world_seeds),
        "final_loss": losses[-1] if losses else None,
        "seconds": round(time.monotonic() - t0, 1),
        "config": _jsonable(asdict(cfg)),
    }
    return report


def export_checkpoint(
    model, out: Path, fmt: TagFormat = DEFAULT, state_dict: dict | None = None
) -> None:
    """Save `model` in bf16 with the agent.json of `fmt`, the tag format it was trained on.
    `state_dict` is the model's full weights where `model` holds only this process's shard
    (DeepSpeed ZeRO-3: `accelerator.get_state_dict` gathers them); a caller under several
    processes calls this on the main one only."""
    import torch

    if state_dict is None:
        model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
        model.to(torch.float32)
    else:
        bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                for k, v in state_dict.items()}  # fmt: skip
        model.save_pretrained(str(out), state_dict=bf16, safe_serialization=True)
        config = json.loads((out / "config.json").read_text())  # it names the model's dtype
        (out / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}, indent=2))
    write_agent_json(out, fmt)


# what a checkpoint's tokenizer may consist of (transformers 5 writes the chat template to its own
# file); every one present travels with the weights
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
)  # fmt: skip


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer files `src` has into `dst`."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


def shrink(model, keep: tuple[int, ...]) -> None:
    """Keep only these decoder layers (in this order): a smaller model that starts from a larger
    one's weights, for a weak revisor or a small student. Layer indices are renumbered, so the
    KV cache and the saved config agree with the new depth."""
    import torch

    layers = model.model.layers
    if not keep or len(set(keep)) != len(keep) or any(not 0 <= i < len(layers) for i in keep):
        raise ValueError(f"keep_layers must name distinct layers of the {len(layers)} in the model")
    model.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]


def completion_mask(
    prompt: object, completion: object, spans: object, vocab_size: int | None = None
) -> list[int]:
    """The env mask of a stored completion (1 generated, 0 inside `spans`), after checking that
    the ids are token ids (below `vocab_size` when given) and the spans lie inside, in order."""
    for name, ids in (("prompt_ids", prompt), ("completion_ids", completion)):
        if not isinstance(ids, list) or not all(type(i) is int and i >= 0 for i in ids):
            raise ValueError(f"{name} must be a list of token ids")
        if vocab_size is not None and any(i >= vocab_size for i in ids):
            raise ValueError(f"{name} has ids outside the tokenizer's {vocab_size}")
    assert isinstance(completion, list)
    mask, last = [1] * len(completion), 0
    if not isinstance(spans, list):
        raise ValueError("env_spans must be a list of [start, end] pairs")
    for span in spans:
        if not (isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)):
            raise ValueError("env_spans must be a list of [start, end] pairs")
        start, end = span
        if not last <= start < end <= len(completion):
            raise ValueError(f"env span {span} is not inside the completion, in order")
        mask[start:end] = [0] * (end - start)
        last = end
    return mask


def distillation_rows(
    path: Path,
    vocab_size: int | None = None,
    check: Callable[[dict, list[int]], None] | None = None,
    kind: str = "distillation row",
) -> list[tuple[dict, list[int]]]:
    """(row, env mask) for each line of a distillation jsonl (`retro_search.write_dataset`);
    `check` may refuse a row with ValueError. Raises ValueError naming the bad line."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            mask = completion_mask(
                row["prompt_ids"], row["completion_ids"], row["env_spans"], vocab_size
            )
            if check is not None:
                check(row, mask)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a {kind} ({e})") from None
        rows.append((row, mask))
    return rows


def read_distillation(path: Path, vocab_size: int | None = None) -> list[dict]:
    """Rows of a distillation jsonl as SFT rows: the loss is on the completion's generated
    tokens; injected documents (its `env_spans`) get none."""
    rows = [
        {
            "input_ids": row["prompt_ids"] + row["completion_ids"],
            "assistant_masks": [0] * len(row["prompt_ids"]) + mask,
        }
        for row, mask in distillation_rows(path, vocab_size)
    ]
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _load_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def _with_seed(config: WorldConfig, seed: int) -> WorldConfig:
    from dataclasses import replace

    return replace(config, seed=seed)


def _tokenizer_texts(worlds: list[tuple[list[dict], list[dict]]], fmt: TagFormat) -> list[str]:
    texts: list[str] = []
    for corpus, questions in worlds:
        texts += [f" {p['title']}: {p['text']}" for p in corpus]
        for q in questions[:300]:
            texts.append(fmt.prompt(q["question"]))
            texts += oracle_segments(q, fmt)
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


async def _trajectories(worlds, tokenizer: Tokenizer, cfg: SFTConfig, fmt: TagFormat) -> list[dict]:
    rng = random.Random(cfg.seed)
    rows: list[dict] = []
    dropped = 0
    bar = tqdm(total=len(worlds) * cfg.per_world, desc="oracle trajectories", unit="traj")
    for corpus, train in worlds:
        retriever = BM25Retriever.build(corpus)
        for q in _sample_questions(train, cfg.per_world, rng):
            traj = await oracle_trajectory(q, tokenizer, retriever, fmt, cfg.top_k, cfg.waste, rng)
            bar.update(1)
            if traj is None:
                dropped += 1
                continue
            rows.append(_row(traj))
    bar.close()
    print(f"oracle: {len(rows)} trajectories, {dropped} dropped (retrieval missed a fact)")
    return rows


async def _knowledge_rows(
    world_dir: Path, tokenizer: Tokenizer, cfg: SFTConfig, fmt: TagFormat = DEFAULT
) -> list[dict]:
    """R1-Searcher++'s cold start on one world: what the model knows, and when to use it.

    - Its corpus as plain text, every token scored (`corpus_epochs` copies): the facts the corpus
      repeats (`well_known`) become knowledge, as pretraining makes a base model know famous
      facts; the rest is seen once or twice, too little to recall.
    - Oracle trajectories on its train split that recall the well-known facts ("I know that ...")
      and search the rest: every question touching a well-known fact (`recall_repeats` copies:
      ~100 of ~4000 questions in the demo world) and `per_world` others, for the search skill.
    """
    world = load_world(world_dir)
    corpus = read_jsonl(world_dir / "corpus.jsonl")
    known = well_known(world, corpus, cfg.min_mentions)
    rng = random.Random(cfg.seed)
    train = read_jsonl(world_dir / "train.jsonl")
    touches = [any((s["entity"], s["relation"]) in known for s in q["chain"]) for q in train]
    recall = [q for q, t in zip(train, touches, strict=True) if t]
    rest = [q for q, t in zip(train, touches, strict=True) if not t]
    questions = recall + _sample_questions(rest, cfg.per_world, rng)
    retriever = BM25Retriever.build(corpus)
    rows: list[dict] = []
    for i, q in enumerate(tqdm(questions, desc="oracle trajectories", unit="traj")):
        traj = await oracle_trajectory(q, tokenizer, retriever, fmt, cfg.top_k, known=known)
        if traj is not None:
            rows += [_row(traj)] * (cfg.recall_repeats if i < len(recall) else 1)
    bos = [tokenizer.bos_id or 0]
    for p in corpus:
        ids = tokenizer.encode(f" {p['title']}: {p['text']}")
        text = {"input_ids": bos + ids, "assistant_masks": [0] + [1] * len(ids)}
        rows += [text] * cfg.corpus_epochs
    print(
        f"knowledge: {len(known)} well-known facts, {len(recall)} questions recall one, "
        f"{len(rows)} rows with {cfg.corpus_epochs} x {len(corpus)} corpus passages"
    )
    return rows


def _row(traj: Trajectory) -> dict:
    """A trajectory as an SFT row: loss on what the policy wrote, none on the prompt or on the
    documents the loop injected (`env_mask` 0)."""
    return {
        "input_ids": traj.prompt_ids + traj.completion_ids,
        "assistant_masks": [0] * len(traj.prompt_ids) + traj.env_mask,
    }


def _copy_rows(tokenizer: Tokenizer, n: int, seed: int) -> list[dict]:
    """Random noise, then a random token span shown twice; loss only on the second copy.

    Measured (4-layer demo model, batch 64, lr 1e-3 constant): copy accuracy 0.05 at step 100,
    0.33 at 400, then the induction phase change: 0.91 by step 600 (the first copied token is
    unpredictable, so ~0.92 is the ceiling). 300 steps at batch 16 never got there."""
    rng = random.Random(seed)
    first = len(SPECIAL_TOKENS)

    def tokens(count: int) -> list[int]:
        return [rng.randrange(first, tokenizer.vocab_size) for _ in range(count)]

    marker = tokenizer.token_id(DEFAULT.eos)  # "the copy starts here"
    rows = []
    for _ in range(n):
        noise, span = tokens(rng.randint(0, 10)), tokens(rng.randint(4, 16))
        prefix = [tokenizer.bos_id or 0] + noise + span + [marker]
        rows.append(
            {
                "input_ids": prefix + span,
                "assistant_masks": [0] * len(prefix) + [1] * len(span),
            }
        )
    return rows


def _train(
    model,
    tokenizer: Tokenizer,
    rows: list[dict],
    cfg: SFTConfig,
    steps: int,
    name: str,
    batch_size: int | None = None,
    schedule: str = "cosine",
    stop_at_accuracy: float | None = None,
):
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    processing = PreTrainedTokenizerFast.from_pretrained(str(cfg.out))
    args = TRLConfig(
        output_dir=str(cfg.out / f".{name.replace(' ', '-')}"),
        max_steps=steps,
        per_device_train_batch_size=batch_size or cfg.batch_size,
        learning_rate=cfg.lr,
        lr_scheduler_type=schedule,
        train_sampling_strategy="group_by_length",  # less padding: ~1/3 fewer tokens per step
        warmup_steps=0.05 if stop_at_accuracy is None else 50,
        adam_beta2=0.98,
        weight_decay=0.0,
        logging_steps=max(1, steps // 20) if stop_at_accuracy is None else 25,
        save_strategy="no",
        report_to="none",
        bf16=cfg.bf16,
        use_cpu=not _cuda(),
        **no_activation_checkpointing(),
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
        callbacks=[_stop_at_accuracy(stop_at_accuracy)] if stop_at_accuracy else None,
    )
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _stop_at_accuracy(target: float):
    """A callback that ends training once the logged `mean_token_accuracy` reaches `target`."""
    from transformers import TrainerCallback

    class StopAtAccuracy(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            accuracy = (logs or {}).get("mean_token_accuracy")
            if accuracy is not None and accuracy >= target:
                print(f"copy accuracy {accuracy:.3f} at step {state.global_step}: warm-up done")
                control.should_training_stop = True

    return StopAtAccuracy()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def changed_settings(recorded: dict, current: dict, same: Callable = lambda k, a, b: a == b) -> str:
    """`key old -> new, ...` for the settings that differ between two records ("" if none)."""
    keys = sorted(k for k in recorded.keys() | current.keys()
                  if not same(k, recorded.get(k), current.get(k)))  # fmt: skip
    return ", ".join(f"{k} {recorded.get(k)!r} -> {current.get(k)!r}" for k in keys)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
