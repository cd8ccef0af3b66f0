"""Splits the model's streamed text into reasoning and answer channels.

The answer is the text between the answer tags; everything else the model writes is reasoning.
Tags may arrive split across deltas (multi-token text tags), so a tail that could still become a
tag is held back until the next delta decides it.
"""

from __future__ import annotations

from agent.events import Channel


class ChannelSplitter:
    def __init__(self, answer_open: str, answer_close: str) -> None:
        self._open = answer_open
        self._close = answer_close
        self._buf = ""
        self.in_answer = False
        self._answer_started = False  # strip the leading space of the answer once

    def push(self, text: str) -> list[tuple[Channel, str]]:
        self._buf += text
        out: list[tuple[Channel, str]] = []
        while True:
            tag = self._close if self.in_answer else self._open
            pos = self._buf.find(tag)
            if pos < 0:
                break
            before = self._buf[:pos]
            self._emit(out, before.rstrip() if self.in_answer else before)
            self._buf = self._buf[pos + len(tag) :]
            self.in_answer = not self.in_answer
            self._answer_started = False
        keep = _partial_suffix(self._buf, self._close if self.in_answer else self._open)
        if self.in_answer:  # spaces before the closing tag are not part of the answer
            head = self._buf[: len(self._buf) - keep]
            keep += len(head) - len(head.rstrip())
        self._emit(out, self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep :]
        return out

    def flush(self) -> list[tuple[Channel, str]]:
        out: list[tuple[Channel, str]] = []
        rest, self._buf = self._buf, ""
        self._emit(out, rest.rstrip() if self.in_answer else rest)
        return out

    def _emit(self, out: list[tuple[Channel, str]], text: str) -> None:
        if self.in_answer and not self._answer_started:
            text = text.lstrip()
            self._answer_started = bool(text)
        if text:
            out.append(("answer" if self.in_answer else "reasoning", text))


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
