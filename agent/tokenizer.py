"""Tokenizer wrapper over the `tokenizers` library (no torch, no transformers) and an incremental
detokenizer for streaming.

Generated ids are only ever *decoded* (for display and parsing), never re-encoded; only text the
service itself injects (prompts, documents, notices) goes through `encode`, and text from outside
(retrieved passages, user questions) through `encode_untrusted`.

Chat checkpoints carry a Jinja chat template (`chat_template` in tokenizer_config.json, or a
`chat_template.jinja` file); `render_chat` renders it the way transformers' `apply_chat_template`
does (sandboxed, trim_blocks/lstrip_blocks, `raise_exception`), without transformers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer


class UnknownTokenError(KeyError, ValueError):
    """A token the tag format needs is not in the checkpoint's vocabulary (a KeyError for the
    callers that look tokens up, a ValueError for those that report bad input in one line)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown token"


class Tokenizer:
    """A checkpoint's tokenizer: `encode` never adds special tokens; `decode` keeps them."""

    def __init__(
        self,
        inner: _HFTokenizer,
        eos_token: str,
        bos_token: str | None = None,
        chat_template: str | None = None,
        extra_eos: Iterable[int] = (),
    ) -> None:
        self._inner = inner
        # A twin that reads special-token strings as plain text: for text we did not write.
        self._plain = _HFTokenizer.from_str(inner.to_str())
        self._plain.encode_special_tokens = True
        added = inner.get_added_tokens_decoder().values()
        self._special = sorted((t.content for t in added if t.special), key=len, reverse=True)
        extra_eos = list(extra_eos)
        if inner.token_to_id(eos_token) is None:  # the format's EOS is not this vocabulary's
            named = (inner.id_to_token(i) for i in extra_eos)
            eos_token = next((t for t in named if t is not None), eos_token)
        self.eos_token = eos_token
        self.eos_id = self.token_id(eos_token)
        # every id that ends generation: the format's EOS and the checkpoint's own (Qwen2.5 lists
        # <|im_end|> and <|endoftext|>; upstream Search-R1 stops on both)
        size = self.vocab_size
        self.stop_ids = frozenset({self.eos_id, *(i for i in extra_eos if 0 <= i < size)})
        self.bos_id = self.token_id(bos_token) if bos_token else None
        self.bos_token = bos_token
        self.chat_template = chat_template
        self._chat = _compile_chat_template(chat_template) if chat_template else None

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        eos_token: str,
        bos_token: str | None = None,
        extra_eos: Iterable[int] = (),
    ) -> Tokenizer:
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: a checkpoint needs a tokenizer.json")
        try:
            inner = _HFTokenizer.from_file(str(file))
        except Exception as exc:  # the tokenizers library raises a bare Exception
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"{file} is not a valid tokenizer.json: {reason}") from None
        return cls(inner, eos_token, bos_token, read_chat_template(Path(path)), extra_eos)

    @property
    def vocab_size(self) -> int:
        return self._inner.get_vocab_size(with_added_tokens=True)

    def vocabulary(self) -> dict[str, int]:
        """Every token string and its id, added tokens included."""
        return self._inner.get_vocab(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        tid = self._inner.token_to_id(token)
        if tid is None:
            raise UnknownTokenError(f"token {token!r} is not in the vocabulary of this tokenizer")
        return tid

    def encode(self, text: str) -> list[int]:
        return self._inner.encode(text, add_special_tokens=False).ids

    def encode_untrusted(self, text: str) -> list[int]:
        """Like `encode`, but a special-token string inside `text` (say "<|eos|>" in a retrieved
        passage) is tokenized as ordinary characters, never as the special token."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def defuse(self, text: str) -> str:
        """`text` with every special-token string in it broken by a zero-width space, so that
        text which must be encoded together with trusted markup (a chat template around a user's
        question) cannot smuggle in a special token."""
        for token in self._special:
            if token in text:
                text = text.replace(token, token[:1] + "\u200b" + token[1:])
        return text

    def decode(self, ids: list[int]) -> str:
        return self._inner.decode(ids, skip_special_tokens=False)

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The checkpoint's chat template applied to `messages` (text, not ids)."""
        if self._chat is None:
            raise ValueError("the checkpoint has no chat template (tokenizer_config.json)")
        try:
            return self._chat.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token,
            )
        except TemplateError as exc:
            raise ValueError(f"chat template: {exc}") from exc


def read_chat_template(path: Path) -> str | None:
    """`chat_template` from tokenizer_config.json (a string, or the entry named "default" of a
    list of named templates), else the text of chat_template.jinja; None when there is none."""
    config = path / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"{config} is not a JSON object: {exc}") from exc
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str):
            return template
    jinja = path / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
    # jinja2's own `tojson` HTML-escapes; chat templates expect plain JSON, as transformers gives.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kw)


def _compile_chat_template(source: str) -> Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ValueError(f"invalid chat template: {exc}") from exc


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
