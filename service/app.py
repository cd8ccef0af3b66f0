"""`create_app(settings)`: loads the model and the index and builds the FastAPI app.

Everything the routes need lives on `app.state` (settings, chat context, metrics); nothing is
global, so tests can run several apps in one process.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from agent.checkpoint import load_format, load_tokenizer
from agent.loop import AgentLoop, Limits
from retrieval.cache import CachedRetriever, MemoryCache, RedisCache
from retrieval.index import fingerprint, load_index
from retrieval.types import Cache
from service.chat import ChatContext
from service.errors import install_handlers
from service.metrics import Metrics, MetricsMiddleware
from service.routes import router
from service.settings import Settings

log = logging.getLogger("searchagent.service")


def create_app(settings: Settings) -> FastAPI:
    """Loads the checkpoint and the index now, so a bad path fails here, before serving."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.ready = True
        log.info("serving %s on %s:%s", settings.model_id, settings.host, settings.port)
        yield
        app.state.ready = False

    app = FastAPI(title="searchagent", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.chat = _load(settings, metrics)
    app.state.ready = False
    install_handlers(app)
    app.include_router(router)
    paths = frozenset(getattr(r, "path", "") for r in router.routes)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=paths)
    return app


def _load(settings: Settings, metrics: Metrics) -> ChatContext:
    from agent.hf_engine import TransformersEngine  # torch only when the embedded engine runs

    fmt = load_format(settings.model, settings.tag_format)
    tokenizer = load_tokenizer(settings.model, fmt)
    engine = TransformersEngine(settings.model, tokenizer, device=settings.device)
    index = load_index(settings.index)
    cache: Cache = (
        RedisCache(settings.redis_url) if settings.redis_url else MemoryCache(settings.cache_size)
    )
    backend = type(index).__name__
    cached = CachedRetriever(
        metrics.timed(index, backend),
        cache,
        namespace=f"{fingerprint(settings.index)}:{backend}",
        ttl_s=settings.cache_ttl_s,
    )
    metrics.watch_cache(cached)
    limits = Limits(
        max_searches=settings.max_searches,
        max_tokens=settings.max_tokens,
        max_context=min(settings.max_context, engine.max_context),
        top_k=settings.top_k,
        retrieval_timeout_s=settings.retrieval_timeout_s,
    )
    return ChatContext(AgentLoop(engine, cached, fmt, limits), settings.model_id, metrics)
