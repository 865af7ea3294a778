"""The FastAPI app (DESIGN §7). Routes are thin: validation at the edge, the flows in service/pipeline.py.

uvicorn --factory service.app:create_app      (what `quiver-serve` runs, settings from QUIVER_*)
"""

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated

import faiss
import torch
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.batcher import MicroBatcher
from service.body_limit import BodyLimit
from service.errors import JSON, CatchAll, http_error, validation_error
from service.metrics import Metrics, RequestTimer
from service.pipeline import Services
from service.reload import RuntimeHolder, listen, poll
from service.schemas import (
    EventsRequest,
    EventsResponse,
    RankRequest,
    RankResponse,
    RecallRequest,
    RecallResponse,
    ReloadResponse,
)
from service.settings import Settings
from service.userstate import RedisStore

log = logging.getLogger("quiver.service")


async def services(request: Request) -> Services:
    """Async on purpose: FastAPI runs a plain `def` dependency on its thread pool, one thread hop per request."""
    return request.app.state.services


Svc = Annotated[Services, Depends(services)]


def _pin_threads(n: int) -> None:
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _pin_threads(settings.torch_threads)
        # OpenMP's thread count is per calling thread: FAISS must be told on the thread that searches.
        executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="quiver-model",
            initializer=_pin_threads,
            initargs=(settings.torch_threads,),
        )
        store = (
            RedisStore(settings.redis_url, settings.redis_timeout_ms, settings.redis_pool_size)
            if settings.redis_url
            else None
        )
        holder = RuntimeHolder(settings, metrics)
        svc = Services(settings, metrics, holder, executor, store, None)
        if settings.microbatch:
            svc.batcher = MicroBatcher(
                svc.run_recall,
                executor,
                settings.batch_max_size,
                settings.batch_max_wait_ms / 1000.0,
                on_batch=metrics.batch_size.observe,
            )
            svc.batcher.start()
        app.state.services = svc
        outcome = await holder.reload()
        if outcome.status == "refused":
            log.error("starting without a model: %s", outcome.reason)
        tasks = []
        if settings.reload_poll_s > 0:
            tasks.append(asyncio.create_task(poll(holder, settings.reload_poll_s), name="quiver-reload-poll"))
        if settings.redis_url:
            tasks.append(asyncio.create_task(listen(holder, settings.redis_url), name="quiver-reload-listen"))
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            if svc.batcher is not None:
                await svc.batcher.stop()
            executor.shutdown(wait=True)
            if store is not None:
                await store.close()

    app = FastAPI(
        title="Quiver",
        summary="Two-tower candidate retrieval with optional TDM reranking",
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=JSON,
    )
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)  # starlette's: 404 and 405 too

    @app.post("/recall", response_model=RecallResponse)
    async def recall(req: RecallRequest, svc: Svc) -> Response:
        return JSON(await svc.recall(req))

    @app.post("/rank", response_model=RankResponse)
    async def rank(req: RankRequest, svc: Svc) -> Response:
        return JSON(await svc.rank(req))

    @app.post("/events", response_model=EventsResponse)
    async def events(req: EventsRequest, svc: Svc) -> Response:
        return JSON(await svc.events(req))

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSON({"status": "ok"})

    @app.get("/readyz")
    async def readyz(svc: Svc) -> Response:
        rt = svc.holder.current
        redis = "not_configured" if svc.store is None else ("ok" if await svc.store.ping() else "degraded")
        if rt is None:
            reason = svc.holder.last_error or "still loading"
            return JSON({"ready": False, "reason": reason, "redis": redis}, status_code=503)
        model, index, ranker = rt.versions
        body = {"ready": True, "redis": redis, "model_version": model, "index_version": index}
        return JSON(body | {"ranker_version": ranker})

    @app.get("/models")
    async def models(svc: Svc) -> Response:
        rt = svc.runtime()
        idx = rt.index.manifest
        ranker = None
        if rt.ranker is not None:
            b = rt.ranker.bundle
            ranker = {"name": b.name, "version": b.version, "type": b.manifest.get("model_type"), "path": str(b.path)}
        return JSON(
            {
                "model": {
                    "name": rt.model.name,
                    "version": rt.model.version,
                    "type": rt.model.manifest.get("model_type"),
                    "similarity": rt.model.manifest.get("similarity"),
                    "path": str(rt.model.path),
                },
                "index": {
                    "name": rt.index.name,
                    "version": rt.index.version,
                    "factory": idx["index"].get("factory"),
                    "metric": idx["metric"],
                    "num_items": int(rt.index.index.ntotal),
                    "recall": idx.get("quality"),
                    "path": str(rt.index.path),
                },
                "ranker": ranker,
                "loaded_at": rt.loaded_at,
            }
        )

    @app.post("/admin/reload", response_model=ReloadResponse)
    async def admin_reload(
        svc: Svc,
        force: bool = False,
        x_quiver_admin_token: Annotated[str | None, Header()] = None,
    ) -> Response:
        expected = svc.settings.admin_token
        if expected is None:
            raise HTTPException(403, detail="admin is disabled: set QUIVER_ADMIN_TOKEN")
        if x_quiver_admin_token is None:
            raise HTTPException(401, detail="missing X-Quiver-Admin-Token header")
        if not hmac.compare_digest(x_quiver_admin_token.encode(), expected.get_secret_value().encode()):
            raise HTTPException(403, detail="wrong X-Quiver-Admin-Token")
        outcome = await svc.holder.reload(force=force)
        model, index, ranker = outcome.versions or (None, None, None)
        body = {
            "status": outcome.status,
            "model_version": model,
            "index_version": index,
            "ranker_version": ranker,
            "reason": outcome.reason,
        }
        return JSON(body, status_code=409 if outcome.status == "refused" else 200)

    @app.get("/metrics")
    async def prometheus(svc: Svc) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    endpoints = {route.path for route in app.routes if hasattr(route, "path")}
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # refuses before anything reads the body
    app.add_middleware(CatchAll, on_error=lambda: metrics.errors.labels("unhandled").inc())
    app.add_middleware(RequestTimer, metrics=metrics, endpoints=endpoints)  # outermost: times the 413s and 500s
    return app
