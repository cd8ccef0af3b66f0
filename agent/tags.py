"""Tag formats: the tag vocabulary, prompt template and document rendering of a checkpoint.

A checkpoint directory names its format in `agent.json`; published checkpoints are served by
naming a preset: `default` (ours), `r1-searcher` and `search-r1` (the published checkpoints; their
tags are multi-token plain text, so segments end on stop strings, not on tag tokens). The preset
strings are protocol — what those checkpoints were trained and evaluated on — and match upstream
byte for byte; each preset names the upstream file it follows.

Tokenization rule of the `default` format (it is what makes a tiny model able to copy): every tag
is one special token, and text after a tag starts with a space, so a name is always tokenized as
" Name" wherever it appears — question, thought, query, document, answer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

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
    # The whole injected block; {open}/{close} are the documents tags, {documents} the rendered
    # passages (or a short error notice).
    docs_template: str = "{open}{documents}{close}"
    chat: bool = False  # True: the prompt is one user turn through the checkpoint's chat template
    doc_separator: str = ""  # between rendered passages (Search-R1 joins them with newlines)
    question_mark: bool = False  # the question ends in "?" (one is added), as in training
    top_k: int | None = None  # passages per search the checkpoint was trained with, if known

    def __post_init__(self) -> None:
        """A format read from a checkpoint's agent.json is checked here, once, so a wrong type or
        a template naming an unknown field fails at load (ValueError), not at the first request."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("tags_are_tokens", "chat", "question_mark"):
                ok, kind = isinstance(value, bool), "true or false"
            elif f.name == "top_k":
                positive = isinstance(value, int) and not isinstance(value, bool) and value > 0
                ok, kind = value is None or positive, "a positive integer or null"
            else:
                ok, kind = isinstance(value, str) or (f.name == "bos" and value is None), "a string"
            if not ok:
                raise ValueError(f"{f.name} must be {kind}, not {value!r}")
        samples = {
            "prompt_template": {"question": "q"},
            "doc_template": {"i": 1, "title": "t", "text": "x"},
            "docs_template": {"open": "o", "close": "c", "documents": "\0"},
        }
        for name, values in samples.items():
            template = getattr(self, name)
            try:
                rendered = template.format(**values)
            except (KeyError, IndexError, ValueError) as exc:
                known = ", ".join("{" + key + "}" for key in values)
                raise ValueError(
                    f"{name} {template!r} is not a template of {known} "
                    f"({type(exc).__name__}: {exc})"
                ) from None
            if name == "docs_template" and rendered.count("\0") != 1:
                raise ValueError(f"docs_template {template!r} must hold {{documents}} once")

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
        question = " ".join(question.split())
        if self.question_mark and question and not question.endswith("?"):
            question += "?"
        return self.prompt_template.format(question=question)

    def documents_block(self) -> tuple[str, str]:
        """The text injected before and after the rendered documents."""
        block = self.docs_template.format(
            open=self.docs_open, close=self.docs_close, documents="\0"
        )
        before, after = block.split("\0")
        return before, after

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """What ends a generation segment: a finished query, a finished answer, or the model
        starting a documents block of its own."""
        return (self.search_close, self.answer_close, self.docs_open)

    def escape(self, text: str) -> str:
        """Neutralise tag strings inside retrieved text so a corpus cannot forge structure."""
        for tag in self.tags:
            if tag in text:
                text = text.replace(tag, tag.replace("<", "‹").replace(">", "›"))
        return text

    def render_documents(self, passages: list[Passage]) -> str:
        """The body between the documents tags (the tags themselves are added by the loop)."""
        return self.doc_separator.join(
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

# R1-Searcher (RUCAIBox/R1-Searcher), for Qwen-2.5-7B-base-RAG-RL: a base model, plain text prompt.
# - prompt: `base_prompt_v0` of evaluation/eval_search_loacl.py, the `--prompt_type v0` that the
#   README's evaluation commands (and so the published eval_results) use. RL training used a
#   slightly different wording (OpenRLHF-RAG/openrlhf/datasets/prompts_dataset.py).
# - injected block: "<|end_of_query|>" + "\n\n<|begin_of_documents|>\n" + docs +
#   "<|end_of_documents|>\n\n" (same file; also the training rollout in
#   OpenRLHF-RAG/openrlhf/trainer/ppo_utils/experience_maker.py). The model writes the query-close
#   tag itself here, so the block starts after it.
# - a passage is f"({i}){line}\n" where `line` is a corpus line; the corpus used for training and
#   for HotpotQA (train/wiki_corpus_load.py `hotpotqa`) writes "Title: t Text: x", as the traces
#   in data/eval_results/hotpotqa_*.jsonl show. (Their KILT corpus for 2Wiki/Bamboogle writes
#   "t   x" instead.)
# - EOS: the eval script stops on "<|im_end|>", "<|endoftext|>", "<|end_of_query|>", "</answer>";
#   of the two EOS strings, a Qwen2.5 *base* model ends text with "<|endoftext|>" (id 151643, the
#   base config's eos; "<|im_end|>" is the chat turn end). Qwen has no BOS token.
R1_SEARCHER = TagFormat(
    name="r1-searcher",
    search_open="<|begin_of_query|>",
    search_close="<|end_of_query|>",
    docs_open="<|begin_of_documents|>",
    docs_close="<|end_of_documents|>",
    answer_open="<answer>",
    answer_close="</answer>",
    think_open="<think>",
    think_close="</think>",
    prompt_template=(
        "The User asks a question, and the Assistant solves it.\n"
        "The Assistant first thinks about the reasoning process in the mind and then provides the "
        "User with the final answer.\n"
        "The output format of reasoning process and final answer are enclosed within "
        "<think> </think> and <answer> </answer> tags, respectively, i.e., "
        '"<think> reasoning process here </think>\n\n<answer> final answer here </answer>".\n'
        "During the thinking process, the Assistant can perform searching for uncertain knowledge "
        'if necessary with the format of "<|begin_of_query|> search query (only keywords) here '
        '<|end_of_query|>". **A query must involve only a single triple**.\n'
        "Then, the system will provide the Assistant with helpful information with the format of "
        '"<|begin_of_documents|> ...search results... <|end_of_documents|>".\n\n'
        "User:{question}\nAssistant: <think>"
    ),
    doc_template="({i})Title: {title} Text: {text}\n",
    bos=None,
    eos="<|endoftext|>",
    tags_are_tokens=False,
    docs_template="\n\n{open}\n{documents}{close}\n\n",
    top_k=5,  # every documents block of its published eval traces holds 5 passages
)

# Search-R1 (PeterGriffinJin/Search-R1), for its Qwen2.5 instruct checkpoints (e.g.
# SearchR1-nq_hotpotqa_train-qwen2.5-7b-em-ppo): the prompt is one user turn through the chat
# template.
# - prompt: infer.py (same text as `make_prefix` in scripts/data_process/nq_search.py, which built
#   the training data; that script also strips the question and appends "?" when missing).
# - injected block: f"\n\n<information>{docs.strip()}</information>\n\n", the observation of
#   search_r1/llm_agent/generation.py `execute_predictions` (training and evaluation). infer.py's
#   `curr_search_template` puts the "\n\n" before the model's own output instead and does not strip.
# - a passage is f"Doc {i}(Title: {title}) {text}\n" (`_passages2string`, both files), where title
#   is the first line of wiki-18's `contents`, quotes included: `Doc 1(Title: "Paul Walker") ...`
#   (example/case.txt). Our corpus loader drops those quotes, so the template puts them back; the
#   strip() of the whole block is the newline separator without a trailing newline.
# - stop: infer.py stops on "</search>" (with optional space/newlines around it) and on
#   EOS ids 151645/151643 = "<|im_end|>"/"<|endoftext|>"; the chat turn ends with "<|im_end|>".
SEARCH_R1 = TagFormat(
    name="search-r1",
    search_open="<search>",
    search_close="</search>",
    docs_open="<information>",
    docs_close="</information>",
    answer_open="<answer>",
    answer_close="</answer>",
    think_open="<think>",
    think_close="</think>",
    prompt_template=(
        "Answer the given question. "
        "You must conduct reasoning inside <think> and </think> first every time you get new "
        "information. "
        "After reasoning, if you find you lack some knowledge, you can call a search engine by "
        "<search> query </search> and it will return the top searched results between "
        "<information> and </information>. "
        "You can search as many times as your want. "
        "If you find no further external knowledge needed, you can directly provide the answer "
        "inside <answer> and </answer>, without detailed illustrations. For example, "
        "<answer> Beijing </answer>. Question: {question}\n"
    ),
    doc_template='Doc {i}(Title: "{title}") {text}',
    bos=None,
    eos="<|im_end|>",
    tags_are_tokens=False,
    docs_template="\n\n{open}{documents}{close}\n\n",
    question_mark=True,  # infer.py and nq_search.py append "?" when the question lacks one
    top_k=3,  # its retriever's topk
    chat=True,
    doc_separator="\n",
)

PRESETS: dict[str, TagFormat] = {f.name: f for f in (DEFAULT, R1_SEARCHER, SEARCH_R1)}

SPECIAL_TOKENS: tuple[str, ...] = ("<|pad|>", "<|bos|>", "<|eos|>", *DEFAULT.tags)


def get_format(name: str) -> TagFormat:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown tag format {name!r}; known: {', '.join(PRESETS)}") from None
