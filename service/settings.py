"""One `Settings` object per app: env vars with prefix `SEARCHAGENT_`, CLI flags override.

Built in `create_app()` (never at import) so tests build their own. Validators reject a missing
checkpoint or index at start-up with a one-line message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from retrieval.remote import RemoteApi


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEARCHAGENT_", protected_namespaces=())

    model: Path | None = Field(
        default=None,
        description="checkpoint directory (HF config, weights, tokenizer, agent.json); "
        "none = a retrieval-only server (`searchagent retrieve-serve`)",
    )
    index: Path | None = Field(
        default=None, description="retrieval index directory (`searchagent index build`)"
    )
    # which retriever: the index's own kind ("index"), one half of a hybrid index ("bm25",
    # "dense"), or a remote retrieval server ("remote", at retriever_url speaking retriever_api)
    retriever: Literal["index", "bm25", "dense", "hybrid", "remote"] = "index"
    retriever_url: str | None = None
    retriever_api: RemoteApi = "searchagent"
    served_model_name: str | None = None  # model id on the API; default: the checkpoint dir name
    tag_format: str | None = None  # preset name overriding the checkpoint's agent.json
    device: str | None = None  # "cpu" / "cuda"; default: cuda when available
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)

    # loop maxima (a request may ask for less)
    max_searches: int = Field(default=8, ge=0)
    max_tokens: int = Field(default=512, ge=1)
    max_context: int = Field(default=2048, ge=16)
    top_k: int = Field(default=3, ge=1, le=50)
    retrieval_timeout_s: float = Field(default=10.0, gt=0)

    # cache: in-memory LRU unless a Redis URL is given
    cache_size: int = Field(default=10_000, ge=0)
    redis_url: str | None = None
    cache_ttl_s: float | None = 3600.0

    # POST /retrieve and /queries
    max_retrieve_k: int = Field(default=100, ge=1)
    max_retrieve_queries: int = Field(default=512, ge=1)
    max_query_chars: int = Field(default=2048, ge=1)

    log_level: str = "info"

    @field_validator("model")
    @classmethod
    def _model_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not (value / "config.json").is_file():
            raise ValueError(f"{value} is not a checkpoint directory (no config.json)")
        return value

    @field_validator("index")
    @classmethod
    def _index_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"index directory {value} does not exist")
        return value

    @model_validator(mode="after")
    def _retrieval_source(self) -> Settings:
        if self.retriever == "remote":
            if not self.retriever_url:
                raise ValueError("retriever 'remote' needs a retriever_url (--retriever-url)")
        elif self.index is None:
            raise ValueError(f"retriever {self.retriever!r} needs an index directory (--index)")
        return self

    @property
    def model_id(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return self.model.resolve().name if self.model is not None else "retrieval-only"
