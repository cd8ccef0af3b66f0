"""Rewards for outcome-based RL, as plain functions of a finished rollout (and its group).

The schemes are the papers':
  - R1-Searcher stage 1 (learn to invoke retrieval): 0.5 for searching at least once, plus 0.5
    for a well-formed trace — `stage1_reward`;
  - R1-Searcher stage 2 (learn to answer): answer F1, with a -2 penalty for a malformed trace —
    `stage2_reward`;
  - R1-Searcher++ (use internal knowledge when it suffices): format + answer (cover-EM) + a group
    reward `group_knowledge_rewards`: among a group's correct rollouts, those with the fewest
    searches get a bonus, so a model that answers correctly without searching (or with fewer
    searches) is preferred over one that searched for what it knew.

A well-formed trace (`format_ok`) is one the loop finished cleanly: it ended on its own (not cut by
the token or context budget), without a format violation (`Trajectory.error`), on the close tag of
its one answer block, written outside any thought (`answer_well_formed`). The loop reads free text
as the answer of a checkpoint that writes no tags; the rewards do not count that as well-formed.
`Rollout` is what a reward needs of one run; `rollout_from` builds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent.events import Finished
from agent.tags import TagFormat
from training.evaluate import cover_exact_match, exact_match, f1_score

STAGE1_RETRIEVAL = 0.5
STAGE1_FORMAT = 0.5
STAGE2_FORMAT_PENALTY = -2.0
GROUP_BONUS = 0.5  # R1-Searcher++: for the correct rollouts with the fewest searches


@dataclass(frozen=True)
class Rollout:
    answer: str  # "" when the model gave none
    searches: int
    format_ok: bool


def rollout_from(finished: Finished, fmt: TagFormat) -> Rollout:
    traj = finished.trajectory
    ok = (
        finished.reason == "stop"
        and traj.error is None
        and traj.answer is not None
        and answer_well_formed(traj.text, fmt)
    )
    return Rollout(traj.answer or "", finished.usage.searches, ok)


def answer_well_formed(text: str, fmt: TagFormat) -> bool:
    """Whether a finished run's text holds exactly one answer block, opened outside any thought
    and closed. The answer-close tag stops the run (the loop's stop set), so a closed block is
    where the run ended; injected documents are escaped, so every tag here was sampled. A
    thought is open from its open tag to its close tag, and from the start when the prompt
    opens it (R1-Searcher's ends with "Assistant: <think>")."""
    if text.count(fmt.answer_open) != 1:
        return False
    start = text.index(fmt.answer_open)
    if fmt.answer_close not in text[start:]:
        return False
    if fmt.think_open and fmt.think_close:
        before = text[:start]
        opened, closed = before.rfind(fmt.think_open), before.rfind(fmt.think_close)
        by_prompt = fmt.prompt_template.rstrip().endswith(fmt.think_open)
        if closed < opened or (by_prompt and closed < 0):
            return False
    return True


def format_reward(r: Rollout) -> float:
    return 1.0 if r.format_ok else 0.0


def em_reward(r: Rollout, gold: str | list[str]) -> float:
    return exact_match(r.answer, gold)


def cover_em_reward(r: Rollout, gold: str | list[str]) -> float:
    return cover_exact_match(r.answer, gold)


def f1_reward(r: Rollout, gold: str | list[str]) -> float:
    return f1_score(r.answer, gold)


def retrieval_reward(r: Rollout) -> float:
    """R1-Searcher stage 1: did the rollout invoke retrieval at all."""
    return 1.0 if r.searches > 0 else 0.0


def stage1_reward(r: Rollout) -> float:
    return STAGE1_RETRIEVAL * retrieval_reward(r) + STAGE1_FORMAT * format_reward(r)


def stage2_reward(r: Rollout, gold: str | list[str]) -> float:
    return f1_reward(r, gold) + (0.0 if r.format_ok else STAGE2_FORMAT_PENALTY)


def group_knowledge_rewards(
    group: Sequence[Rollout], golds: Sequence[str | list[str]]
) -> list[float]:
    """R1-Searcher++'s internal-knowledge reward for one group (the rollouts of one prompt):
    GROUP_BONUS for each correct (cover-EM), well-formed rollout whose search count is the
    group's smallest among its correct ones; 0 for the rest."""
    correct = [
        r.format_ok and cover_em_reward(r, g) == 1.0 for r, g in zip(group, golds, strict=True)
    ]
    fewest = min((r.searches for r, ok in zip(group, correct, strict=True) if ok), default=None)
    return [
        GROUP_BONUS if ok and r.searches == fewest else 0.0
        for r, ok in zip(group, correct, strict=True)
    ]


def plus_rewards(group: Sequence[Rollout], golds: Sequence[str | list[str]]) -> list[float]:
    """R1-Searcher++'s total for one group: format + answer (cover-EM) + group reward."""
    bonus = group_knowledge_rewards(group, golds)
    return [
        format_reward(r) + cover_em_reward(r, g) + b
        for r, g, b in zip(group, golds, bonus, strict=True)
    ]
