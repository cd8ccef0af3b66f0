"""Outcome-based RL with retrieval in the loop, on TRL's `GRPOTrainer`.

Run: `searchagent train rl --init artifacts/demo/sft --out artifacts/demo/rl-stage1 --stage 1`.

Rollouts come from our own `AgentLoop` — the one the service runs — decoding with the live policy
(`TransformersEngine(model=…)` over the trainer's model, sessions invalidated after every update)
and searching the real index. TRL gets them through `rollout_func`: the sampled and injected
tokens as one completion, and `env_mask` (1 sampled, 0 injected documents) so document tokens get
no loss and no gradient. Stages (`RLConfig.stage`):

  "1"     R1-Searcher stage 1 — reward retrieval invocation + format (`rewards.stage1_reward`);
  "2"     R1-Searcher stage 2 — reward answer F1, -2 for a malformed trace;
  "plus"  R1-Searcher++ — format + cover-EM + the group internal-knowledge reward, plus the
          memorization loss: mu x NLL of each correct rollout rewritten without search (its
          reasoning before the first search, then the answer), so what was retrieved and used
          becomes knowledge. mu weighs it per optimizer step: each micro-step of a generation
          computes its share of the rows (`memorization_share`).

The policy loss is TRL's GRPO loss (group-normalized advantages); `beta > 0` adds its KL term
against the initial model.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.checkpoint import load_format, load_tokenizer
from agent.engine import SamplingParams
from agent.events import Finished
from agent.loop import (
    DEADLINE_ERROR,
    RETRIEVAL_TIMED_OUT,
    RETRIEVAL_UNAVAILABLE,
    AgentLoop,
    Limits,
    RunParams,
)
from agent.tags import TagFormat
from agent.tokenizer import Tokenizer
from training import rewards
from training.model import activation_checkpointing
from training.oracle import RECALL
from training.sft import (
    _jsonable,
    changed_settings,
    check_number,
    copy_tokenizer_files,
    export_checkpoint,
    training_format,
)

STAGES = ("1", "2", "plus")


class RolloutError(RuntimeError):
    """Rollouts kept failing for a reason outside the policy (the retriever down); one line."""


@dataclass(frozen=True)
class RLConfig:
    init: Path  # the checkpoint to start from (SFT, or an earlier stage)
    out: Path
    data: Path  # jsonl with question / answer (the demo world's train split)
    index: Path | None = None  # the retrieval index rollouts search (or `retriever_url`)
    stage: str = "1"
    steps: int = 40
    prompts_per_step: int = 4
    num_generations: int = 4  # the GRPO group: rollouts per prompt
    lr: float = 2e-5
    beta: float = 0.0  # KL coefficient against the initial model
    temperature: float = 1.0
    max_tokens: int = 160
    # prompt + sampled + injected tokens of one rollout (the loop's `Limits.max_context`): a
    # rollout that reaches it ends unfinished (malformed), so give room for max_tokens and the
    # documents of max_searches searches
    max_context: int = 2048
    max_searches: int = 4
    top_k: int = 3
    mu: float = 0.1  # R1-Searcher++ memorization loss weight
    max_questions: int | None = 2000
    types: tuple[str, ...] | None = None  # train only on these question types (None: all)
    seed: int = 0
    resume: bool = False  # continue from the last checkpoint in `out`
    save_steps: int = 20
    # -- real scale (configs/rl/): the same rollouts, on a vLLM server, with remote retrieval --
    # TRL's vLLM server mode: rollouts decode on this server (`VLLM_SERVER_DEV_MODE=1 vllm serve`
    # or `trl vllm-serve`) through OpenAIEngine, and TRL pushes the policy's weights to it
    # before every rollout batch. None: decode with the live policy in this process.
    vllm_url: str | None = None
    vllm_model: str | None = None  # the model name that server serves (default: str(init))
    vllm_extra: dict[str, Any] | None = None  # added to every completion request's body
    retriever_url: str | None = None  # search this retrieval server instead of `index`
    retriever_api: str = "searchagent"  # its request shape (retrieval.remote.APIS)
    # a rollout whose search found the retriever failing (down, erring, timing out), or that its
    # deadline cut, is decoded again after waits of 1, 2, 4, ... 30 s that add up to at most
    # this; then the run stops (`RolloutError`): a reward for answering without documents
    # teaches doing without them
    retrieval_patience_s: float = 300.0
    rollout_deadline_s: float = 300.0  # one rollout's wall clock (the loop's request deadline)
    # tag format preset: for an `init` without agent.json, or the one its agent.json names
    format: str | None = None
    per_device_batch: int | None = None  # None: prompts_per_step x num_generations
    gradient_accumulation_steps: int = 1
    bf16: bool = False
    # recompute activations in the backward pass (TRL's default): off for the demo's small model,
    # on at real scale, where a batch of long rollouts' activations would not fit
    gradient_checkpointing: bool = False


def run_rl(cfg: RLConfig) -> dict:
    """Train, export the policy to `cfg.out` (HF directory + agent.json), return a report with
    the per-step log (reward, EM, searches)."""
    t0 = time.monotonic()
    resume = _check_resume(cfg)
    trainer = build_trainer(cfg)
    accelerator = trainer.accelerator
    if accelerator.is_main_process:
        if not resume:
            # a new run, its settings checked: an old run's checkpoint must not be resumed later
            # as ours (removed only now, so a run refused above leaves the old one resumable)
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            for old in (cfg.out / ".trainer").glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
                shutil.rmtree(old)
        _record_run(cfg)
    accelerator.wait_for_everyone()
    try:
        trainer.train(resume_from_checkpoint=True if resume else None)
    except RolloutError:
        # the progress bar would repaint itself at exit, after the error: it goes first
        for callback in trainer.callback_handler.callbacks:
            if getattr(callback, "training_bar", None) is not None:
                callback.training_bar.close()
        raise
    # every process takes part in gathering the weights (ZeRO-3 holds a shard on each); the main
    # one writes them
    state = accelerator.get_state_dict(trainer.model_wrapped)
    policy = trainer.rollout_func.__self__
    if accelerator.is_main_process:
        export_checkpoint(accelerator.unwrap_model(trainer.model), cfg.out, policy.fmt, state)
        copy_tokenizer_files(cfg.init, cfg.out)
    log = [_step_row(h) for h in trainer.state.log_history if "reward" in h]
    report = {
        "stage": cfg.stage,
        "steps": trainer.state.global_step,
        "seconds": round(time.monotonic() - t0, 1),
        "log": log,
        "config": _jsonable(asdict(cfg)),
    }
    if accelerator.is_main_process:
        (cfg.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return report


def build_trainer(cfg: RLConfig):
    """The GRPO trainer for `cfg`, its rollouts from our agent loop (not yet trained)."""
    if cfg.stage not in STAGES:
        raise ValueError(f"unknown RL stage {cfg.stage!r}; known: {list(STAGES)}")
    check_number("retrieval_patience_s", cfg.retrieval_patience_s, positive=False, finite=False)
    check_number("rollout_deadline_s", cfg.rollout_deadline_s, positive=True, finite=False)
    check_number("lr", cfg.lr, positive=True)
    check_number("beta", cfg.beta, positive=False)
    check_number("mu", cfg.mu, positive=False)
    check_number("max_context", cfg.max_context, positive=True)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(cfg.seed)
    # refused when init's agent.json names another format: its policy would earn no reward
    fmt = training_format(cfg.init, cfg.format) or load_format(cfg.init)
    tokenizer = load_tokenizer(cfg.init, fmt)
    rows = _read_rows(cfg.data, cfg.max_questions, cfg.seed, cfg.types)
    dataset = Dataset.from_list([{"prompt": r["question"], "answer": r["answer"]} for r in rows])
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(cfg.init), dtype=dtype)
    processing = PreTrainedTokenizerFast.from_pretrained(str(cfg.init))
    if processing.pad_token is None:
        processing.pad_token = "<|pad|>"
    retriever = rollout_retriever(cfg)  # before `out` exists: a bad index leaves nothing behind
    cfg.out.mkdir(parents=True, exist_ok=True)
    golds = {r["question"]: r["answer"] for r in rows}
    policy = _Policy(fmt, tokenizer, retriever, cfg, golds)
    return _make_trainer(model, grpo_args(cfg), dataset, processing, policy, cfg)


def grpo_args(cfg: RLConfig):
    """TRL's `GRPOConfig` for `cfg`."""
    import torch
    from trl import GRPOConfig

    batch = cfg.per_device_batch or cfg.prompts_per_step * cfg.num_generations
    vllm = (
        # our rollouts come back without sampling logprobs (`_Policy._output`), which TRL's
        # importance-sampling correction (on by default) would subtract
        {
            "use_vllm": True,
            "vllm_mode": "server",
            "vllm_server_base_url": cfg.vllm_url,
            "vllm_importance_sampling_correction": False,
        }
        if cfg.vllm_url
        else {}
    )
    return GRPOConfig(
        output_dir=str(cfg.out / ".trainer"),
        max_steps=cfg.steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_generations=cfg.num_generations,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        beta=cfg.beta,
        temperature=cfg.temperature,
        max_completion_length=cfg.max_tokens * 4,  # sampled + injected tokens
        logging_steps=1,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=1,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        **activation_checkpointing(cfg.gradient_checkpointing),
        bf16=cfg.bf16,
        seed=cfg.seed,
        shuffle_dataset=True,
        log_completions=False,
        reward_weights=[1.0, 0.0, 0.0, 0.0],  # _Policy.reward trains; em/searches/format: logged
        **vllm,
    )


RUN_FILE = ".trainer/run.json"  # the settings of the run whose checkpoints `.trainer` holds


# what a resume may change: how long it goes on, how often it saves, the sampling seed
_RESUMABLE = (
    "resume", "out", "steps", "save_steps", "seed", "retrieval_patience_s", "rollout_deadline_s"
)  # fmt: skip


def _run_settings(cfg: RLConfig) -> dict:
    return {k: v for k, v in _jsonable(asdict(cfg)).items() if k not in _RESUMABLE}


def _check_resume(cfg: RLConfig) -> bool:
    """Whether to resume from `out`'s last trainer checkpoint. `out` must be new, empty, or an
    earlier RL run's (it has `.trainer`), never an SFT checkpoint or anything else; a resume must
    have the settings of the run it continues (stage 1's optimizer state and step count taken
    as stage 2's start would be another run); a resume with nothing to resume says so."""
    from retrieval.outputs import check_out_dir

    check_out_dir(cfg.out, ".trainer", "RL run")
    if not cfg.resume:
        return False
    last = last_checkpoint_step(cfg.out)
    if last is None:
        print(
            f"no checkpoint under {cfg.out / '.trainer'}: training from the start", file=sys.stderr
        )
        return False
    recorded_file = cfg.out / RUN_FILE
    if recorded_file.is_file():
        # a setting added since that run was recorded had its default there
        recorded = {**_defaults(), **json.loads(recorded_file.read_text())}
        if were := changed_settings(recorded, _run_settings(cfg)):
            raise ValueError(f"--resume: {cfg.out} holds a run with other settings ({were})")
    if last >= cfg.steps:  # TRL would train one step more anyway
        raise ValueError(
            f"--resume: {cfg.out} is at step {last} already; give --steps above {last} to go on"
        )
    return True


def _defaults() -> dict:
    """The run settings' defaults (`_run_settings` of a config that sets nothing)."""
    from dataclasses import MISSING, fields

    return {
        f.name: _jsonable(f.default)
        for f in fields(RLConfig)
        if f.default is not MISSING and f.name not in _RESUMABLE
    }


def last_checkpoint_step(out: Path) -> int | None:
    """The step of the trainer checkpoint a resume of the run in `out` continues from (the one
    transformers' `get_last_checkpoint` picks), or None when there is none."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

    folder = out / ".trainer"
    last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    return None if last is None else int(Path(last).name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-"))


def _record_run(cfg: RLConfig) -> None:
    path = cfg.out / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_run_settings(cfg), indent=2) + "\n")


_LOGGED = ("reward", "rewards/", "loss", "memorization", "rollout/")


def _step_row(h: dict) -> dict:
    keep = {"step": h.get("step")}
    for key, value in h.items():
        if key.startswith(_LOGGED) or key == "kl":
            keep[key] = value
    return keep


_RETRIEVER_FAULTS = (RETRIEVAL_UNAVAILABLE, RETRIEVAL_TIMED_OUT)


def _fault(finished: Finished) -> tuple[str, str] | None:
    """Why this rollout says nothing about the policy, as (what failed, its own words): the
    retriever failed one of its searches, or the rollout's wall-clock deadline cut it (a slow
    retriever or engine, not the policy: its length is bounded by `max_tokens`). None if neither."""
    traj = finished.trajectory
    for search in traj.searches:
        if search.error in _RETRIEVER_FAULTS:
            return "retrieval", search.cause or search.error
    if traj.error == DEADLINE_ERROR:
        searching = bool(traj.searches) and traj.searches[-1].error == DEADLINE_ERROR
        return "deadline", "cut while searching" if searching else "cut while decoding"
    return None


def _log_length_ratio(trainer, finished: list[Finished]) -> None:
    """Log `rollout/length_ratio`, the share of rollouts their token or context budget cut (over
    every process). TRL's `completions/clipped_ratio` reads 1.0 here: it counts a completion
    without EOS as truncated, and ours end on the answer's close tag."""
    if trainer is None:
        return
    cut = [f.reason == "length" for f in finished]
    if trainer.accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        cut = gather_object(cut)
    trainer._metrics["train"]["rollout/length_ratio"].append(sum(cut) / max(1, len(cut)))


def _most_on_any_process(trainer, count: int) -> int:
    """The largest `count` over the training processes (this one's alone without a trainer)."""
    if trainer is None or trainer.accelerator.num_processes == 1:
        return count
    from accelerate.utils import gather_object

    return max(gather_object([count]))


class _Policy:
    """The rollout side: the agent loop over the live policy, and the rewards TRL calls."""

    def __init__(
        self, fmt: TagFormat, tokenizer: Tokenizer, retriever, cfg: RLConfig, golds: dict
    ) -> None:
        self.golds = golds  # question -> gold answer (for the memorization targets)
        self.fmt = fmt
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.cfg = cfg
        self.limits = Limits(
            max_searches=cfg.max_searches,
            max_tokens=cfg.max_tokens,
            max_context=cfg.max_context,
            top_k=cfg.top_k,
            deadline_s=cfg.rollout_deadline_s,
        )
        self.loop: AgentLoop | None = None
        # the last rollouts' memorization rows: (prompt ids, rewritten completion ids)
        self.memorize: list[tuple[list[int], list[int]]] = []
        self._seed = cfg.seed * 1_000_003
        self.retried = 0  # times failed rollouts were decoded again (retriever or deadline)
        # one event loop for every rollout: the retriever (a dense index's micro-batcher) and
        # the engine's deliveries stay bound to the loop they first ran on
        self._events = asyncio.new_event_loop()

    def rollout(self, prompts: list[str], trainer) -> dict[str, Any]:
        """TRL's `rollout_func`: one agent run per prompt (TRL already repeats each prompt
        `num_generations` times, consecutively). The policy decodes in this process, or on the
        vLLM server of `cfg.vllm_url`, whose weights TRL has just synced. A rollout in which the
        retriever failed, or that its deadline cut, is decoded again
        (`cfg.retrieval_patience_s`), never trained on."""
        finished = self._decode(prompts, trainer)
        start, slept, wait = time.monotonic(), 0.0, 1.0
        while True:
            faults = {i: c for i, f in enumerate(finished) if (c := _fault(f))}
            # every process decides alike: one that stopped alone would leave the rest waiting
            # in the trainer's next gather
            worst = _most_on_any_process(trainer, len(faults))
            if worst == 0:
                _log_length_ratio(trainer, finished)
                return self._output(prompts, finished)
            kind, cause = next(iter(faults.values()), ("retrieval", "on another process"))
            if kind == "retrieval":
                where = self.cfg.retriever_url or self.cfg.index
                said = f"retrieval from {where} failed in {worst} of {len(finished)} rollouts"
            else:
                assert self.loop is not None  # `_decode` made it
                deadline = self.loop.limits.deadline_s
                said = f"{worst} of {len(finished)} rollouts ran past their {deadline:g} s deadline"
            if slept + wait > self.cfg.retrieval_patience_s:
                raise RolloutError(
                    f"{said} ({cause}) for {time.monotonic() - start:.0f} s; nothing was "
                    f"trained on them. Once that is fixed, resume from the last checkpoint in "
                    f"{self.cfg.out} (train rl --resume; a pipeline run resumes by itself)"
                )
            self.retried += 1
            if trainer is None or trainer.accelerator.is_main_process:
                print(f"{said} ({cause}); decoding them again in {wait:.0f} s", file=sys.stderr)
            time.sleep(wait)
            slept, wait = slept + wait, min(2 * wait, 30.0)
            failed = list(faults)
            again = self._decode([prompts[i] for i in failed], trainer) if failed else []
            for i, f in zip(failed, again, strict=True):
                finished[i] = f

    def _decode(self, prompts: list[str], trainer) -> list[Finished]:
        if self.loop is None:
            self.loop = AgentLoop(self._engine(trainer), self.retriever, self.fmt, self.limits)
        if self.cfg.vllm_url:
            return self._events.run_until_complete(self._run_all(prompts))
        model = trainer.accelerator.unwrap_model(trainer.model)
        self.loop.engine.invalidate()  # type: ignore[attr-defined]
        was_training = model.training
        model.eval()
        try:
            return self._events.run_until_complete(self._run_all(prompts))
        finally:
            model.train(was_training)

    def _engine(self, trainer):
        """The vLLM server's `OpenAIEngine`, or a `TransformersEngine` over the live policy."""
        if self.cfg.vllm_url:
            from agent.openai_engine import OpenAIEngine

            name = self.cfg.vllm_model or str(self.cfg.init)
            return OpenAIEngine(
                self.cfg.vllm_url, self.tokenizer, name, extra_body=self.cfg.vllm_extra
            )
        from agent.hf_engine import TransformersEngine

        model = trainer.accelerator.unwrap_model(trainer.model)
        return TransformersEngine(None, self.tokenizer, model=model, max_sessions=0)

    def _output(self, prompts: list[str], finished: list[Finished]) -> dict[str, Any]:
        """What TRL takes back from `rollout_func`."""
        out: dict[str, Any] = {
            "prompt_ids": [f.trajectory.prompt_ids for f in finished],
            "completion_ids": [f.trajectory.completion_ids for f in finished],
            "env_mask": [f.trajectory.env_mask for f in finished],
            "logprobs": None,
            "rollout": [rewards.rollout_from(f, self.fmt) for f in finished],
        }
        self.memorize = self._memorize(prompts, finished) if self.cfg.stage == "plus" else []
        return out

    def _memorize(self, prompts: list[str], finished: list[Finished]) -> list:
        """R1-Searcher++'s memorization rows: each correct, well-formed rollout that searched,
        rewritten without search."""
        rows = []
        for question, f in zip(prompts, finished, strict=True):
            r = rewards.rollout_from(f, self.fmt)
            gold = self.golds.get(question)
            if gold is None or not r.format_ok or r.searches == 0:
                continue
            if rewards.cover_em_reward(r, gold) == 1.0:
                ids = rewritten_without_search(
                    f.trajectory.text, r.answer, self.fmt, self.tokenizer
                )
                rows.append((f.trajectory.prompt_ids, ids))
        return rows

    async def _run_all(self, prompts: list[str]) -> list[Finished]:
        async def one(question: str) -> Finished:
            assert self.loop is not None
            self._seed += 1
            sampling = SamplingParams(temperature=self.cfg.temperature, seed=self._seed)
            finished = None
            async for event in self.loop.run(self.loop.prompt_ids(question), RunParams(sampling)):
                if isinstance(event, Finished):
                    finished = event
            assert finished is not None
            return finished

        return list(await asyncio.gather(*(one(q) for q in prompts)))

    # -- rewards (TRL reward functions: lists in, one float per completion out) ------------

    def reward(self, prompts, completions, rollout, answer, **_) -> list[float]:
        stage, g = self.cfg.stage, self.cfg.num_generations
        if stage == "1":
            return [rewards.stage1_reward(r) for r in rollout]
        if stage == "2":
            return [rewards.stage2_reward(r, a) for r, a in zip(rollout, answer, strict=True)]
        out: list[float] = []
        for start in range(0, len(rollout), g):
            out += rewards.plus_rewards(rollout[start : start + g], answer[start : start + g])
        return out

    def em(self, prompts, completions, rollout, answer, **_) -> list[float]:
        return [rewards.em_reward(r, a) for r, a in zip(rollout, answer, strict=True)]

    def searches(self, prompts, completions, rollout, **_) -> list[float]:
        return [float(r.searches) for r in rollout]

    def format_ok(self, prompts, completions, rollout, **_) -> list[float]:
        return [rewards.format_reward(r) for r in rollout]


def rewritten_without_search(
    text: str, answer: str, fmt: TagFormat, tokenizer: Tokenizer
) -> list[int]:
    """A correct trace rewritten as if what it retrieved were known (R1-Searcher++'s
    memorization target): every search and its documents are cut out and the thoughts around
    them joined into one, each thought that read documents stated as a recall ("I know that X
    was born in Y.", the cold start's words for internal knowledge), then the answer block
    exactly as the policy wrote it (`<answer> X</answer>`: its own spacing) and nothing after
    it, since a run ends at the answer's close tag, never at an EOS.

    Measured on the demo (2026-11-22): the earlier target, the first thought then the answer,
    trained a multi-hop question's plan ("I need the country of the birthplace of X, so first
    the birthplace of X.") to be followed by the final answer, no facts between; RL++ fell to
    2-hop EM 0.719 from its cold start's 0.789."""
    start = text.rfind(fmt.answer_open)
    end = text.find(fmt.answer_close, start) if start >= 0 else -1
    if end >= 0:
        block = text[start : end + len(fmt.answer_close)]
    else:
        start, block = len(text), f"{fmt.answer_open} {answer}{fmt.answer_close}"
    head, *rounds = text[:start].split(fmt.search_open)
    merged = head
    for round_ in rounds:  # "query</search><documents>…</documents><think> fact. …</think>"
        read = round_.split(fmt.docs_close, 1)[1] if fmt.docs_close in round_ else ""
        if merged.endswith(fmt.think_close) and read.startswith(fmt.think_open):
            merged = merged[: -len(fmt.think_close)] + RECALL + read[len(fmt.think_open) :]
        else:
            merged += read
    return tokenizer.encode(merged + block)


def _make_trainer(model, args, dataset, processing, policy: _Policy, cfg: RLConfig):
    """A `GRPOTrainer` over `policy`'s rollouts; for stage "plus" one that adds the
    memorization loss to each step's loss."""
    from trl import GRPOTrainer

    class Trainer(GRPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if cfg.stage != "plus" or not model.training:
                return loss
            return loss + self.memorization_loss(model)

        def memorization_loss(self, model):
            """This micro-step's part of mu x the memorization NLL. One generation's rows feed
            `steps_per_generation` micro-steps (TRL's `_step` counts them; the policy loss
            divides by gradient accumulation), so each takes its share of the rows, weighted
            so that one optimizer step's parts add up to mu x NLL."""
            rows, weight = memorization_share(
                policy.memorize,
                self._step % self.args.steps_per_generation,
                self.args.steps_per_generation,
                self.current_gradient_accumulation_steps,
            )
            if _most_on_any_process(self, len(rows)) == 0:
                return 0.0
            if not rows:
                # another process runs the forward: under ZeRO-3 its parameter gathers are
                # collective, so this one runs one too, on a pad token, at weight 0
                pad = processing.pad_token_id
                return 0.0 * memorization_nll(model, [([pad], [pad])], pad)
            nll = memorization_nll(model, rows, processing.pad_token_id)
            self._metrics["train"]["memorization_nll"].append(nll.item())
            return cfg.mu * weight * nll

    # TRL logs each as rewards/<method name>; only the stage's reward trains, the rest is logged
    funcs = [policy.reward, policy.em, policy.searches, policy.format_ok]
    return Trainer(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=dataset,
        processing_class=processing,
        rollout_func=policy.rollout,
    )


def memorization_share(rows: list, micro: int, parts: int, accumulation: int) -> tuple[list, float]:
    """Micro-step `micro`'s rows of the `parts` micro-steps one generation's `rows` feed, and the
    weight of their mean NLL: over the `accumulation` micro-steps of an optimizer step the weights
    add up to 1 (each row counted once, not `accumulation` times at full weight)."""
    share = rows[micro::parts]
    return share, len(share) * parts / (len(rows) * accumulation) if share else 0.0


def memorization_nll(model, rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Mean NLL of the completions given their prompts (prompt tokens carry no loss)."""
    import torch

    seqs = [p + c for p, c in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        labels[i, len(p) : n] = torch.tensor(c)
        attention[i, :n] = 1
    device = next(model.parameters()).device
    out = model(
        input_ids=ids.to(device), attention_mask=attention.to(device), labels=labels.to(device)
    )
    return out.loss


def rollout_retriever(cfg: RLConfig):
    """The retriever rollouts search: a retrieval server (`retriever_url`, e.g. our
    `retrieve-serve` over a Wikipedia index) or a local index directory."""
    if cfg.retriever_url:
        from retrieval.remote import RemoteRetriever

        return RemoteRetriever(cfg.retriever_url, cfg.retriever_api)
    if cfg.index is None:
        raise ValueError("RL rollouts need an index directory or a retriever_url")
    from retrieval.index import load_index

    return load_index(cfg.index)


def read_config(path: Path) -> RLConfig:
    """An `RLConfig` from a JSON file of its fields (configs/rl/*.json). Raises ValueError
    naming an unknown or missing field."""
    from dataclasses import fields

    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of RLConfig fields")
    known = {f.name: f for f in fields(RLConfig)}
    if unknown := sorted(set(raw) - set(known)):
        raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}")
    paths = {"init", "out", "index", "data"}
    try:
        values = {
            k: Path(v) if k in paths else tuple(v) if k == "types" else v for k, v in raw.items()
        }
        return RLConfig(**values)
    except TypeError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _read_rows(
    path: Path, limit: int | None, seed: int, types: tuple[str, ...] | None = None
) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if types is not None:
        present = {r.get("type") for r in rows}
        if missing := [t for t in types if t not in present]:  # a typo would quietly narrow it
            known = ", ".join(sorted(str(t) for t in present))
            raise ValueError(f"{path} has no questions of type {', '.join(missing)} ({known})")
        rows = [r for r in rows if r.get("type") in types]
    random.Random(seed).shuffle(rows)
    return rows[:limit] if limit else rows
