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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character table, as byte-level BPE vocabularies spell bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def test_stop_string_completed_by_a_token_ending_in_half_a_character(tmp_path):
    """Guards against a stop found one token late: the token `>\\xc3` completes "</answer>" but
    its text ends in half of "é", which the detokenizer holds back, so the stop was seen only
    on the next token — one extra sampled token after a tag (after a search close, between
    the query and the documents)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from agent.engine import StopStrings
    from agent.tokenizer import Tokenizer

    spell = _bytes_to_unicode()
    vocab = {spell[b]: b for b in range(256)}
    vocab[spell[ord(">")] + spell[0xC3]] = 256  # ">" and the first byte of "é"
    vocab["<|eos|>"] = 257
    bpe = HFTokenizer(models.BPE(vocab=vocab, merges=[(spell[ord(">")], spell[0xC3])]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path, eos_token="<|eos|>")
    ids = [*b"</answer", 256, 0xA9, ord("!")]  # as sampled (encode splits ">" from "é")
    assert tok.decode(ids) == "</answer>é!"
    stops = StopStrings(tok, ("</answer>", "é!"))
    hits = [stops.push([i]) for i in ids]
    assert hits == [None] * 8 + ["</answer>", None, "é!"]  # each once, on its last token
