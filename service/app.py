"""`create_app(settings)`: loads the retriever (and the model, unless retrieval-only) and builds
the FastAPI app.

Everything the routes need lives on `app.state` (settings, chat context, metrics); nothing is
global, so tests can run several apps in one process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from agent.checkpoint import load_format, load_tokenizer
from agent.engine import Engine
from agent.loop import AgentLoop, Limits
from agent.tokenizer import Tokenizer
from retrieval.cache import CachedRetriever, MemoryCache, RedisCache
from retrieval.index import load_index, read_manifest
from retrieval.remote import RemoteRetriever
from retrieval.types import Cache, Retriever
from service.chat import ChatContext
from service.drain import Drain, DrainDeadline
from service.errors import install_handlers
from service.metrics import Metrics
from service.middleware import Admission, ApiKeys, BodyLimit, RequestLog
from service.retrieval_api import RetrievalContext
from service.retrieval_api import router as retrieval_router
from service.routes import router
from service.settings import Settings

log = logging.getLogger("searchagent.service")
DEFAULT_TOP_K = 3  # passages per search when neither the settings nor the tag format say


def create_app(settings: Settings) -> FastAPI:
    """Loads the index (and the checkpoint, when one is set) now, so a bad path fails here."""
    metrics = Metrics()
    drain = Drain(settings.drain_timeout_s)  # `service.cli` runs a server that begins it
    retriever, closers = build_retriever(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        drain.bind(asyncio.get_running_loop())
        app.state.ready = True
        log.info("serving %s on %s:%s", settings.model_id, settings.host, settings.port)
        yield
        app.state.ready = False
        for close in closers:
            await close()

    app = FastAPI(title="searchagent", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.drain = drain
    app.state.retrieval = RetrievalContext(
        retriever,
        default_k=settings.top_k or DEFAULT_TOP_K,
        max_k=settings.max_retrieve_k,
        max_queries=settings.max_retrieve_queries,
        max_query_chars=settings.max_query_chars,
        max_passages=settings.max_retrieve_passages,
        blank_queries=metrics.blank_queries,
    )
    app.state.chat = _load_chat(settings, metrics, retriever, closers) if settings.model else None
    app.state.ready = False
    install_handlers(app)
    app.include_router(router)
    app.include_router(retrieval_router)
    paths = frozenset(getattr(r, "path", "") for r in (*router.routes, *retrieval_router.routes))
    # added innermost first: a request meets them in the reverse order (see service/middleware.py)
    app.add_middleware(
        Admission,
        max_running=settings.max_running_requests,
        max_queued=settings.max_queued_requests,
        metrics=metrics,
        retry_after_s=settings.retry_after_s,
    )
    app.add_middleware(DrainDeadline, drain=drain)  # a request queued for a slot is ended too
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_keys:
        app.add_middleware(ApiKeys, keys=[k.get_secret_value() for k in settings.api_keys])
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            # any header, as vLLM: OpenAI's SDKs send their own (openai-node's X-Stainless-*)
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestLog, metrics=metrics, routes=paths)
    return app


def build_retriever(settings: Settings, metrics: Metrics) -> tuple[Retriever, list]:
    """The configured backend, timed by backend label and wrapped in the cache (none when
    `cache_size` is 0 and there is no Redis); plus what must be closed at shutdown."""
    closers = []
    if settings.retriever == "remote":
        assert settings.retriever_url is not None  # Settings checked it
        key = settings.retriever_api_key
        backend: Retriever = RemoteRetriever(
            settings.retriever_url,
            settings.retriever_api,
            timeout_s=settings.retrieval_timeout_s,
            headers={"Authorization": f"Bearer {key.get_secret_value()}"} if key else None,
        )
        closers.append(backend.aclose)
        label = "remote"
        namespace = f"remote:{settings.retriever_api}:{settings.retriever_url}"
    else:
        assert settings.index is not None
        part = None if settings.retriever == "index" else settings.retriever
        manifest = read_manifest(settings.index)
        label = part or manifest["kind"]
        if settings.encoder is not None and label == "bm25":
            raise ValueError(
                f"an encoder (--encoder) applies to a dense or hybrid index; "
                f"{settings.index} is searched with bm25"
            )
        backend = load_index(settings.index, part=part, encoder_path=settings.encoder)
        namespace = f"{manifest['fingerprint']}:{label}"
    timed = metrics.timed(backend, label)
    if not settings.redis_url and settings.cache_size == 0:
        return timed, closers
    cache: Cache = (
        RedisCache(settings.redis_url) if settings.redis_url else MemoryCache(settings.cache_size)
    )
    cached = CachedRetriever(timed, cache, namespace=namespace, ttl_s=settings.cache_ttl_s)
    metrics.watch_cache(cached)
    return cached, closers


def _load_chat(
    settings: Settings, metrics: Metrics, retriever: Retriever, closers: list
) -> ChatContext:
    assert settings.model is not None
    fmt = load_format(settings.model, settings.tag_format)
    tokenizer = load_tokenizer(settings.model, fmt)
    engine, max_context = build_engine(settings, tokenizer, closers)
    limits = Limits(
        max_searches=settings.max_searches,
        max_tokens=settings.max_tokens,
        max_context=min(settings.max_context, max_context or settings.max_context),
        top_k=settings.top_k or fmt.top_k or DEFAULT_TOP_K,
        retrieval_timeout_s=settings.retrieval_timeout_s,
        deadline_s=settings.deadline_s,
    )
    return ChatContext(AgentLoop(engine, retriever, fmt, limits), settings.model_id, metrics)


def build_engine(
    settings: Settings, tokenizer: Tokenizer, closers: list
) -> tuple[Engine, int | None]:
    """The configured engine and its context length (None: unknown, the settings decide)."""
    if settings.engine == "openai":
        from agent.openai_engine import OpenAIEngine, discover_model

        assert settings.engine_url is not None  # Settings checked it
        key = settings.engine_api_key.get_secret_value() if settings.engine_api_key else None
        name, max_len = settings.engine_model, None
        if name is None:  # ask the server (fails start-up with a clear message if it is down)
            name, max_len = discover_model(settings.engine_url, key)
        remote = OpenAIEngine(
            settings.engine_url,
            tokenizer,
            name,
            api_key=key,
            connect_timeout_s=settings.engine_connect_timeout_s,
            read_timeout_s=settings.engine_read_timeout_s,
            retries=settings.engine_retries,
            max_context=max_len,
            extra_body=settings.engine_extra_body,
        )
        closers.append(remote.aclose)
        log.info("engine: %s at %s", name, settings.engine_url)
        return remote, max_len
    from agent.hf_engine import TransformersEngine  # torch only when the embedded engine runs

    assert settings.model is not None
    local = TransformersEngine(
        settings.model,
        tokenizer,
        device=settings.device,
        max_parked_tokens=settings.max_parked_tokens,
    )
    return local, local.max_context
