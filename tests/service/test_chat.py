"""Chat handler state: how an agent run's events become the response content and frames."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.events import Finished, Token, Trajectory, Usage
from service.chat import RunState
from service.protocol import ChatCompletionChunk, ChunkFrames, Delta, StreamChoice


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


TEXT = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)  # any but surrogates


@settings(max_examples=300, deadline=None)
@given(
    model=TEXT,
    index=st.integers(0, 3),
    values=st.lists(st.one_of(st.none(), TEXT), min_size=3, max_size=3),
    second=TEXT,
)
def test_templated_token_frames_equal_pydantics(model, index, values, second):
    """Guards against the streaming fast path drifting from the schema-checked rendering: a
    token's frame spliced from the cached template must be byte-identical to the chunk rendered
    through pydantic, for any text (quotes, backslashes, control characters, non-ASCII), any
    model name, and again for the same template's second use."""
    frames = ChunkFrames("chatcmpl-0123", 1_795_000_000, model)
    for texts in (values, [None if v is None else second for v in values]):
        fields = ("content", "reasoning_content", "reasoning")
        delta = Delta(**dict(zip(fields, texts, strict=True)))
        expected = ChatCompletionChunk(
            id="chatcmpl-0123",
            created=1_795_000_000,
            model=model,
            choices=[StreamChoice(index=index, delta=delta)],
        ).model_dump_json()
        assert frames.delta(index, delta) == f"data: {expected}\n\n"
