"""Train the demo's byte-level BPE tokenizer on world text, with every tag a single special token.

Saved both as a bare `tokenizer.json` (what the agent loads, through `tokenizers` only) and with
`transformers`' config files, so `AutoTokenizer.from_pretrained(dir)` works on a checkpoint too.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from agent.tags import DEFAULT, SPECIAL_TOKENS


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


def save_tokenizer(tok: Tokenizer, out_dir: str | Path) -> None:
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=DEFAULT.bos, eos_token=DEFAULT.eos, pad_token="<|pad|>"
    )
    fast.save_pretrained(str(out))
    tok.save(str(out / "tokenizer.json"))
