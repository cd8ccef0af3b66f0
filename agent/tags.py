"""Tag formats: the tag vocabulary, prompt template and document rendering of a checkpoint.

A checkpoint directory names its format in `agent.json`; published checkpoints are served by
naming a preset. Only `default` exists so far; `r1-searcher` and `search-r1` come with the engine
work (their tags are multi-token text, which needs stop-string matching).

Tokenization rule of the `default` format (it is what makes a tiny model able to copy): every tag
is one special token, and text after a tag starts with a space, so a name is always tokenized as
" Name" wherever it appears — question, thought, query, document, answer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from retrieval.types import Passage


@dataclass(frozen=True)
class TagFormat:
    name: str
    search_open: str
    search_close: str
    docs_open: str
    docs_close: str
    answer_open: str
    answer_close: str
    think_open: str
    think_close: str
    prompt_template: str  # text template with {question}
    doc_template: str  # one passage: {i} (1-based), {title}, {text}
    bos: str | None
    eos: str
    tags_are_tokens: bool  # True: each tag is a single special token

    @property
    def tags(self) -> tuple[str, ...]:
        return (
            self.search_open,
            self.search_close,
            self.docs_open,
            self.docs_close,
            self.answer_open,
            self.answer_close,
            self.think_open,
            self.think_close,
        )

    def prompt(self, question: str) -> str:
        return self.prompt_template.format(question=" ".join(question.split()))

    def escape(self, text: str) -> str:
        """Neutralise tag strings inside retrieved text so a corpus cannot forge structure."""
        for tag in self.tags:
            if tag in text:
                text = text.replace(tag, tag.replace("<", "‹").replace(">", "›"))
        return text

    def render_documents(self, passages: list[Passage]) -> str:
        """The body between the documents tags (the tags themselves are added by the loop)."""
        return "".join(
            self.doc_template.format(
                i=i, title=self.escape(p.title.strip()), text=self.escape(p.text.strip())
            )
            for i, p in enumerate(passages, 1)
        )

    def to_json(self) -> dict[str, object]:
        return asdict(self)


DEFAULT = TagFormat(
    name="default",
    search_open="<search>",
    search_close="</search>",
    docs_open="<documents>",
    docs_close="</documents>",
    answer_open="<answer>",
    answer_close="</answer>",
    think_open="<think>",
    think_close="</think>",
    prompt_template=" question: {question} ",
    doc_template=" ({i}) {title}: {text}",
    bos="<|bos|>",
    eos="<|eos|>",
    tags_are_tokens=True,
)

PRESETS: dict[str, TagFormat] = {DEFAULT.name: DEFAULT}

SPECIAL_TOKENS: tuple[str, ...] = ("<|pad|>", "<|bos|>", "<|eos|>", *DEFAULT.tags)


def get_format(name: str) -> TagFormat:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown tag format {name!r}; known: {', '.join(PRESETS)}") from None
