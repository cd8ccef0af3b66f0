"""Oracle trajectories for the SFT cold start.

The oracle knows the world graph (each question carries its `chain` of facts), so it knows what
to think, what to search and what to answer. It speaks through a `ScriptedEngine` inside the real
`AgentLoop`, so the documents in its trajectories are the retriever's real results, tokenized and
masked (`env_mask` 0) exactly as at serving time. A trajectory whose retrieval did not surface a
needed fact is dropped: the model must never learn to answer from nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.engine import SamplingParams
from agent.events import Finished, Trajectory
from agent.loop import AgentLoop, Limits, RunParams
from agent.scripted import ScriptedEngine
from agent.tags import TagFormat
from agent.tokenizer import Tokenizer
from retrieval.types import Retriever


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


def oracle_segments(question: dict, fmt: TagFormat) -> list[str]:
    """The oracle's text for each round: think + search, ..., think + answer.

    Every name follows a space and every tag is followed by a space (see `agent.tags`)."""
    steps = question["chain"]

    def need(step: dict) -> str:
        return RELATIONS[step["relation"]].need.format(e=step["entity"])

    def fact(step: dict) -> str:
        return RELATIONS[step["relation"]].fact.format(e=step["entity"], v=step["value"])

    def search(step: dict) -> str:
        query = f"{step['entity']} {RELATIONS[step['relation']].keyword}"
        return f"{fmt.search_open} {query}{fmt.search_close}"

    think_open, think_close = fmt.think_open, fmt.think_close
    segments = [f"{think_open} I need {need(steps[0])}.{think_close}{search(steps[0])}"]
    for prev, step in zip(steps, steps[1:], strict=False):
        thought = f" {fact(prev)}. Next I need {need(step)}."
        segments.append(f"{think_open}{thought}{think_close}{search(step)}")
    facts = [steps[-1]] if question["type"] != "comparison" else steps
    summary = " ".join(f"{fact(s)}." for s in facts)
    answer = f"{fmt.answer_open} {question['answer']}{fmt.answer_close}"
    segments.append(f"{think_open} {summary}{think_close}{answer}")
    return segments


async def oracle_trajectory(
    question: dict, tokenizer: Tokenizer, retriever: Retriever, fmt: TagFormat, top_k: int
) -> Trajectory | None:
    """Run the oracle through the real loop; None when retrieval missed a needed fact."""
    segments = [tokenizer.encode(s) for s in oracle_segments(question, fmt)]
    engine = ScriptedEngine(tokenizer, segments)
    loop = AgentLoop(engine, retriever, fmt, Limits(max_tokens=4096, max_context=8192))
    params = RunParams(SamplingParams(), top_k=top_k)
    finished = None
    async for event in loop.run(loop.prompt_ids(question["question"]), params):
        if isinstance(event, Finished):
            finished = event
    assert finished is not None
    traj = finished.trajectory
    if traj.answer != question["answer"] or len(traj.searches) != len(question["chain"]):
        return None
    for step, record in zip(question["chain"], traj.searches, strict=True):
        shown = " ".join(f"{p.title}: {p.text}" for p in record.passages)
        if f" {step['value']}" not in f" {shown}":
            return None
    return traj
