"""Incremental detokenization and the reasoning/answer channel splitter."""

from __future__ import annotations

from agent.channels import ChannelSplitter
from agent.tokenizer import Detokenizer


def test_detokenizer_streams_exact_text_with_multibyte_characters(tokenizer):
    """Guards against U+FFFD garbage when a character spans several byte-level tokens."""
    text = " Drell is a city with a café. Émile lives there 🙂."
    ids = tokenizer.encode(text)
    detok = Detokenizer(tokenizer)
    pieces = [detok.push([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_splitter_handles_tags_split_across_deltas():
    """Guards against a text tag arriving in pieces being leaked as content or reasoning."""
    s = ChannelSplitter("<answer>", "</answer>")
    out = []
    for delta in ["<think> ok</think><ans", "wer> Vel", "mora  </an", "swer>"]:
        out += s.push(delta)
    out += s.flush()
    reasoning = "".join(t for c, t in out if c == "reasoning")
    answer = "".join(t for c, t in out if c == "answer")
    assert reasoning == "<think> ok</think>"
    assert answer == "Velmora"
