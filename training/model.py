"""The demo policy: a tiny Llama-style causal LM created from config (no pretrained weights)."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig, LlamaForCausalLM


@dataclass(frozen=True)
class ModelSize:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 1024
    max_positions: int = 2048


TINY_TEST = ModelSize(hidden=64, layers=2, heads=2, intermediate=176, max_positions=2048)


def create_model(
    vocab_size: int, size: ModelSize, pad_id: int, bos_id: int, eos_id: int, seed: int = 0
):
    """A freshly initialised policy; the same `seed` gives the same weights (the global RNG is
    left as it was)."""
    import torch

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=size.max_positions,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def no_activation_checkpointing() -> dict[str, bool]:
    """Trainer kwargs that turn activation checkpointing off (TRL's GRPO turns it on by default,
    and recomputing activations only slows a model this small)."""
    return activation_checkpointing(False)


def activation_checkpointing(on: bool) -> dict[str, bool]:
    """Trainer kwargs that turn activation checkpointing on or off. transformers 5.23 renamed the
    argument to `activation_checkpointing` and warns on the old name, which older 5.x need (TRL's
    default sets the old name: leaving it unset warns too)."""
    from transformers import TrainingArguments

    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__:
        return {"activation_checkpointing": on}
    return {"gradient_checkpointing": on}
