"""One `Settings` object per app: env vars with prefix `SEARCHAGENT_`, CLI flags override.

Built in `create_app()` (never at import) so tests build their own. Validators reject a missing
checkpoint or index at start-up with a one-line message.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEARCHAGENT_", protected_namespaces=())

    model: Path = Field(
        description="checkpoint directory (HF config, weights, tokenizer, agent.json)"
    )
    index: Path = Field(description="retrieval index directory (`searchagent index build`)")
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

    log_level: str = "info"

    @field_validator("model")
    @classmethod
    def _model_dir(cls, value: Path) -> Path:
        if not (value / "config.json").is_file():
            raise ValueError(f"{value} is not a checkpoint directory (no config.json)")
        return value

    @field_validator("index")
    @classmethod
    def _index_dir(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"index directory {value} does not exist")
        return value

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model.resolve().name
