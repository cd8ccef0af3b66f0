"""One `Settings` object per app: env vars with prefix `SEARCHAGENT_`, CLI flags override.

Built in `create_app()` (never at import) so tests build their own. Validators reject a missing
checkpoint or index at start-up with a one-line message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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
    retriever_api_key: SecretStr | None = None  # Bearer token for the remote retriever (env only)
    # the encoder a dense or hybrid index is searched with; default: the one recorded at build
    encoder: Path | None = None
    served_model_name: str | None = None  # model id on the API; default: the checkpoint dir name
    tag_format: str | None = None  # preset name overriding the checkpoint's agent.json
    device: str | None = None  # "cpu" / "cuda"; default: cuda when available (transformers)

    # the model engine: in-process transformers, or a remote vLLM/SGLang OpenAI-compatible
    # server ("openai"), for which `model` still supplies the tokenizer and agent.json
    engine: Literal["transformers", "openai"] = "transformers"
    engine_url: str | None = None  # the server's root, e.g. http://vllm:8000
    engine_model: str | None = None  # its model name; default: the first of its /v1/models
    engine_api_key: SecretStr | None = None  # Bearer token for the engine server (env only)
    engine_connect_timeout_s: float = Field(default=5.0, gt=0)
    engine_read_timeout_s: float = Field(default=120.0, gt=0)  # longest silence mid-stream
    engine_retries: int = Field(default=3, ge=0)  # on connection failures only
    # merged into every engine request (env JSON), e.g. {"top_k": 20} for vLLM, or
    # {"agent": false} when the engine server is another searchagent
    engine_extra_body: dict[str, Any] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)

    # loop maxima (a request may ask for less)
    max_searches: int = Field(default=8, ge=0)
    max_tokens: int = Field(default=512, ge=1)
    max_context: int = Field(default=2048, ge=16)
    # passages per search; unset: the tag format's own (r1-searcher 5, search-r1 3), else 3
    top_k: int | None = Field(default=None, ge=1, le=50)
    retrieval_timeout_s: float = Field(default=10.0, gt=0)
    deadline_s: float = Field(default=300.0, gt=0)  # a whole agent run

    # the embedded engine's parked keys/values (finished rows kept for the next round of their
    # conversation): tokens in all, least recently used evicted first; 0: none parked
    max_parked_tokens: int = Field(default=65_536, ge=0)

    # cache: in-memory LRU of cache_size entries (0: no cache) unless a Redis URL is given
    cache_size: int = Field(default=10_000, ge=0)
    redis_url: str | None = None
    cache_ttl_s: float | None = 3600.0

    # POST /retrieve and /queries
    max_retrieve_k: int = Field(default=100, ge=1)
    max_retrieve_queries: int = Field(default=4096, ge=1)  # Search-R1: 512 prompts x 5 rollouts
    max_query_chars: int = Field(default=2048, ge=1)
    # queries x k per request: 4096 x 100 passages is a 140 MB reply, seconds of CPU to encode
    max_retrieve_passages: int = Field(default=50_000, ge=1)

    # limits: generation requests beyond max_running wait in a queue of max_queued, then 429
    max_running_requests: int = Field(default=16, ge=1)
    max_queued_requests: int = Field(default=64, ge=0)
    retry_after_s: int = Field(default=1, ge=0)  # the 429's Retry-After
    max_body_bytes: int = Field(default=1_000_000, ge=1)  # larger request bodies get a 413
    drain_timeout_s: float = Field(default=30.0, ge=0)  # SIGTERM: in-flight requests may finish

    # security: Bearer API keys (none = open), e.g. SEARCHAGENT_API_KEYS=key1,key2 or a JSON
    # list; browser origins allowed by CORS (none = no CORS headers)
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    log_level: str = "info"
    log_json: bool = True  # JSON lines on stderr (`searchagent serve`)

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        """From the environment: `a,b` or a JSON list."""
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("["):
            return json.loads(value)
        return [v.strip() for v in value.split(",") if v.strip()]

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        for key in value:
            _check_key(key)
        return value

    @field_validator("retriever_api_key")
    @classmethod
    def _retriever_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _check_key(value)
        return value

    @field_validator("encoder")
    @classmethod
    def _encoder_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not (value / "config.json").is_file():
            raise ValueError(f"{value} is not an encoder directory (no config.json)")
        return value

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
            if self.encoder is not None:
                raise ValueError("encoder applies to a local dense or hybrid index, not 'remote'")
        elif self.index is None:
            raise ValueError(f"retriever {self.retriever!r} needs an index directory (--index)")
        elif self.retriever_api_key is not None:
            raise ValueError("retriever_api_key applies to retriever 'remote' (--retriever remote)")
        return self

    @model_validator(mode="after")
    def _engine_source(self) -> Settings:
        if self.engine == "openai":
            if not self.engine_url:
                raise ValueError("engine 'openai' needs an engine_url (--engine-url)")
            if not self.engine_url.startswith(("http://", "https://")):
                raise ValueError(f"engine_url {self.engine_url!r} is not an http(s) URL")
            if self.device:
                raise ValueError("device applies to the transformers engine, not 'openai'")
        elif self.engine_url or self.engine_model or self.engine_extra_body:
            raise ValueError(
                "engine_url, engine_model and engine_extra_body apply to engine 'openai' "
                "(--engine openai)"
            )
        return self

    @property
    def model_id(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return self.model.resolve().name if self.model is not None else "retrieval-only"


def _check_key(key: SecretStr) -> None:
    """A Bearer token goes into a header: it must be non-empty and hold no whitespace."""
    secret = key.get_secret_value()
    if not secret or any(c.isspace() for c in secret):
        raise ValueError("an API key must be non-empty and contain no whitespace")
