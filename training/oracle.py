"""Oracle trajectories for the SFT cold start.

The oracle knows the world graph (each question carries its `chain` of facts), so it knows what
to think, what to search and what to answer. It speaks through a `ScriptedEngine` inside the real
`AgentLoop`, so the documents in its trajectories are the retriever's real results, tokenized and
masked (`env_mask` 0) exactly as at serving time. A trajectory whose retrieval did not surface a
needed fact is dropped: the model must never learn to answer from nothing.

It speaks any `TagFormat`: each round is a closed thought then a search (`default`, `search-r1`),
or, where the prompt itself opens the thought (R1-Searcher's `Assistant: <think>`), one thought
that holds every search and closes before the answer, as R1-Searcher's traces do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from agent.engine import SamplingParams
from agent.events import Finished, Trajectory
from agent.loop import AgentLoop, Limits, RunParams
from agent.scripted import ScriptedEngine
from agent.tags import TagFormat
from agent.tokenizer import Tokenizer
from retrieval.types import Retriever

# How a thought states internal knowledge: the cold start's recalled hops ("I know that X was born
# in Y.") and R1-Searcher++'s memorization targets (`training.rl.rewritten_without_search`)
RECALL = " I know that"


@dataclass(frozen=True)
class Relation:
    need: str  # "the birthplace of {e}"
    fact: str  # "{e} was born in {v}"
    keyword: str  # appended to the entity name in the query


RELATIONS: dict[str, Relation] = {
    "born_in": Relation("the birthplace of {e}", "{e} was born in {v}", "birthplace"),
    "birth_year": Relation("the birth year of {e}", "{e} was born in {v}", "born"),
    "married_to": Relation("the spouse of {e}", "{e} is married to {v}", "spouse"),
    "works_for": Relation("the employer of {e}", "{e} works for {v}", "works"),
    "located_in": Relation("the country of {e}", "{e} is in {v}", "country"),
    "founded_by": Relation("the founder of {e}", "{e} was founded by {v}", "founder"),
    "founded_in": Relation("the founding year of {e}", "{e} was founded in {v}", "founded"),
    "headquartered_in": Relation("the headquarters of {e}", "{e} is based in {v}", "headquarters"),
    "directed_by": Relation("the director of {e}", "{e} was directed by {v}", "director"),
    "written_by": Relation("the author of {e}", "{e} was written by {v}", "author"),
    "released_in": Relation("the release year of {e}", "{e} was released in {v}", "released"),
}


@dataclass(frozen=True)
class Waste:
    """How often an oracle trace wastes effort the ways search agents do, per hop: a *detour*
    switches to another line of inquiry before the hop's search ("Alternatively, I could look up
    ...", searches it, comes back); a *recheck* re-searches the fact just found ("Wait, let me
    double-check ..."). A policy trained on such traces wastes at these rates, which is what the
    demo's Retro-Search runs revise away. The default wastes nothing."""

    detour: float = 0.0
    recheck: float = 0.0


# Relations asked of the same kind of entity: where a detour goes instead.
_SIBLINGS = (
    ("born_in", "birth_year", "married_to", "works_for"),
    ("founded_by", "founded_in", "headquartered_in"),
    ("directed_by", "written_by", "released_in"),
)


def oracle_segments(
    question: dict,
    fmt: TagFormat,
    waste: Waste = Waste(),
    rng: random.Random | None = None,
    known: frozenset[tuple[str, str]] = frozenset(),
) -> list[str]:
    """The oracle's text for each round: think + search, ..., think + answer.

    A hop whose (entity, relation) is in `known` is recalled ("I know that X was born in Y.")
    instead of searched: R1-Searcher++'s cold start answers from internal knowledge where the
    model has it. Every name follows a space and every tag is followed by a space (see
    `agent.tags`)."""
    return _plan(question, fmt, waste, rng or random.Random(0), known)[0]


def _plan(
    question: dict,
    fmt: TagFormat,
    waste: Waste,
    rng: random.Random,
    known: frozenset[tuple[str, str]] = frozenset(),
) -> tuple[list[str], list[int | None]]:
    """(segments, for each search the chain step it looks up, None for a detour)."""
    steps = question["chain"]

    def need(step: dict) -> str:
        return RELATIONS[step["relation"]].need.format(e=step["entity"])

    def fact(step: dict) -> str:
        return RELATIONS[step["relation"]].fact.format(e=step["entity"], v=step["value"])

    def search(step: dict) -> str:
        query = f"{step['entity']} {RELATIONS[step['relation']].keyword}"
        return f"{fmt.search_open} {query}{fmt.search_close}"

    opened = fmt.prompt_template.rstrip().endswith(fmt.think_open)  # one thought, from the prompt

    def think(text: str, last: bool = False) -> str:
        if opened:
            return text + (fmt.think_close if last else "")
        return f"{fmt.think_open}{text}{fmt.think_close}"

    segments: list[str] = []
    looks_up: list[int | None] = []
    thought, stated, searched = "", set(), False  # the open thought; hops it states
    for i, step in enumerate(steps):
        if i == 0 and len(steps) > 1:
            thought += f" I need {_goal(question, steps)}, so first {need(step)}."
        else:
            if searched:  # what the last documents said
                thought += f" {fact(steps[i - 1])}."
                stated.add(i - 1)
            thought += f"{' Next' if i else ''} I need {need(step)}."
        if (step["entity"], step["relation"]) in known:
            thought += f"{RECALL} {fact(step)}."
            stated.add(i)
            searched = False
            continue
        if waste.detour and rng.random() < waste.detour:  # no draw at 0: the plain SFT data
            other = {**step, "relation": _sibling(step["relation"], rng)}
            detour = f" Alternatively, I could look up {need(other)} first."
            segments.append(think(thought + detour) + search(other))
            looks_up.append(None)
            thought = f" That is not what I need. I need {need(step)}."
        segments.append(think(thought) + search(step))
        looks_up.append(i)
        thought, stated, searched = "", set(), True
        if waste.recheck and rng.random() < waste.recheck:
            recheck = f" {fact(step)}. Wait, let me double-check {need(step)}."
            segments.append(think(recheck) + search(step))
            looks_up.append(i)
    last = [len(steps) - 1] if question["type"] != "comparison" else range(len(steps))
    summary = "".join(f" {fact(steps[i])}." for i in last if i not in stated)
    answer = f"{fmt.answer_open} {question['answer']}{fmt.answer_close}"
    segments.append(think(thought + summary, last=True) + answer)
    return segments, looks_up


def _goal(question: dict, steps: list[dict]) -> str:
    """A multi-hop question's whole plan, which the first thought states: "the country of the
    birthplace of X", "the birth year of X and the birth year of Y". Measured on the committed
    cold start trained without it: it answered after the first search on 33 of 40 2-hop
    questions (teacher-forced, the token after the first fact was the think close instead of
    " Next"). Deciding at that point needs the question's form, ~100 document tokens back; the
    plan's ", so first" in the model's own thought is a nearby, fixed cue."""
    if question["type"] == "comparison":
        return " and ".join(RELATIONS[s["relation"]].need.format(e=s["entity"]) for s in steps)
    goal = steps[0]["entity"]
    for step in steps:
        goal = RELATIONS[step["relation"]].need.format(e=goal)
    return goal


def _sibling(relation: str, rng: random.Random) -> str:
    group = next((g for g in _SIBLINGS if relation in g), tuple(RELATIONS))
    return rng.choice([r for r in group if r != relation])


async def oracle_trajectory(
    question: dict,
    tokenizer: Tokenizer,
    retriever: Retriever,
    fmt: TagFormat,
    top_k: int,
    waste: Waste = Waste(),
    rng: random.Random | None = None,
    known: frozenset[tuple[str, str]] = frozenset(),
) -> Trajectory | None:
    """Run the oracle through the real loop; None when retrieval missed a needed fact."""
    texts, looks_up = _plan(question, fmt, waste, rng or random.Random(0), known)
    segments = [tokenizer.encode(s) for s in texts]
    engine = ScriptedEngine(tokenizer, segments)
    loop = AgentLoop(engine, retriever, fmt, Limits(max_tokens=4096, max_context=8192))
    params = RunParams(SamplingParams(), top_k=top_k)
    finished = None
    async for event in loop.run(loop.prompt_ids(question["question"]), params):
        if isinstance(event, Finished):
            finished = event
    assert finished is not None
    traj = finished.trajectory
    if traj.answer != question["answer"] or len(traj.searches) != len(looks_up):
        return None
    for i, record in zip(looks_up, traj.searches, strict=True):
        shown = " ".join(f"{p.title}: {p.text}" for p in record.passages)
        if i is not None and f" {question['chain'][i]['value']}" not in f" {shown}":
            return None
    return traj
