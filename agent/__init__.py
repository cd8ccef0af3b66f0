"""The controlled decode loop, tag formats and engines. See `agent.loop` for the state machine."""

from agent.engine import Engine, SamplingParams, StopSpec, TokenChunk
from agent.events import (
    AgentEvent,
    Answer,
    Documents,
    Finished,
    SearchStarted,
    Token,
    Trajectory,
    Usage,
)
from agent.loop import AgentLoop, Limits, RunParams
from agent.tags import DEFAULT, TagFormat, get_format
from agent.tokenizer import Tokenizer

__all__ = [
    "DEFAULT",
    "AgentEvent",
    "AgentLoop",
    "Answer",
    "Documents",
    "Engine",
    "Finished",
    "Limits",
    "RunParams",
    "SamplingParams",
    "SearchStarted",
    "StopSpec",
    "TagFormat",
    "Token",
    "TokenChunk",
    "Tokenizer",
    "Trajectory",
    "Usage",
    "get_format",
]
