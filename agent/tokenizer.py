"""Tokenizer wrapper over the `tokenizers` library (no torch, no transformers) and an incremental
detokenizer for streaming.

Generated ids are only ever *decoded* (for display and parsing), never re-encoded; only text the
service itself injects (prompts, documents, notices) goes through `encode`.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    """A checkpoint's tokenizer: `encode` never adds special tokens; `decode` keeps them."""

    def __init__(self, inner: _HFTokenizer, eos_token: str, bos_token: str | None = None) -> None:
        self._inner = inner
        self.eos_token = eos_token
        self.eos_id = self.token_id(eos_token)
        self.bos_id = self.token_id(bos_token) if bos_token else None

    @classmethod
    def from_dir(cls, path: str | Path, eos_token: str, bos_token: str | None = None) -> Tokenizer:
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: a checkpoint needs a tokenizer.json")
        return cls(_HFTokenizer.from_file(str(file)), eos_token, bos_token)

    @property
    def vocab_size(self) -> int:
        return self._inner.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        tid = self._inner.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return tid

    def encode(self, text: str) -> list[int]:
        return self._inner.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._inner.decode(ids, skip_special_tokens=False)


class Detokenizer:
    """Turns a growing id sequence into text deltas (TGI's prefix/read-offset scheme).

    Decoding token by token breaks multi-byte characters and byte-level merges, so each step
    decodes a short window and emits only the new suffix; text ending in U+FFFD (an incomplete
    UTF-8 sequence) is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids before this index have been emitted as text

    def push(self, ids: list[int]) -> str:
        self._ids.extend(ids)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        full_text = self._tok.decode(self._ids[self._prefix :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the end of the stream)."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        full_text = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :]
