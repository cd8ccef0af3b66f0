"""Train the demo's byte-level BPE tokenizer on world text, with every tag a single special token.

Saved both as a bare `tokenizer.json` (what the agent loads, through `tokenizers` only) and with
`transformers`' config files, so `AutoTokenizer.from_pretrained(dir)` works on a checkpoint too.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from agent.tags import DEFAULT, SPECIAL_TOKENS

# What a demo checkpoint trained in a chat format (`search-r1`) renders its turns with: each turn
# opens with the BOS token, so the role names stay plain text after a special token.
DEMO_CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|> {{ m['role'] }}: {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|bos|> assistant:{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, chat_template: str | None = None) -> None:
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=DEFAULT.bos, eos_token=DEFAULT.eos, pad_token="<|pad|>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(out))
    tok.save(str(out / "tokenizer.json"))
