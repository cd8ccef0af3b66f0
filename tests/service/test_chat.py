"""Chat handler state: how an agent run's events become the response content."""

from __future__ import annotations

from agent.events import Finished, Token, Trajectory, Usage
from service.chat import RunState


def finished(answer: str | None) -> Finished:
    return Finished("stop", Usage(prompt_tokens=3), Trajectory([1, 2, 3], answer=answer))


def test_fallback_answer_is_sent_once_when_no_answer_tags_were_streamed():
    """Guards against streaming and non-streaming disagreeing when the model never writes
    answer tags: the loop's fallback answer must reach `content` on both paths, exactly once."""
    state = RunState()
    state.add(Token("<think> it is Velmora", [5], "reasoning"))
    state.add(finished("it is Velmora"))
    assert state.final_text() == "it is Velmora"
    assert state.final_text() is None
    assert "".join(state.content) == "it is Velmora"


def test_streamed_answer_is_not_repeated():
    """Guards against the answer appearing twice when it was already streamed."""
    state = RunState()
    state.add(Token("Velmora", [7], "answer"))
    state.add(finished("Velmora"))
    assert state.final_text() is None
    assert "".join(state.content) == "Velmora"
