"""The FastAPI app (DESIGN §7): `create_app` wires the routers (service/routes/), the middleware and the lifespan.

uvicorn --factory service.app:create_app      (what `quiver-serve` runs, settings from QUIVER_*)
"""

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial

import faiss
import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import sched_slice
from service.batcher import MicroBatcher
from service.body_limit import BodyLimit
from service.cpus import plan
from service.errors import CatchAll, http_error, validation_error
from service.metrics import Metrics, RequestTimer
from service.model_process import IN_FLIGHT, ModelProcess
from service.pipeline import Services, recall_batch, recall_remote
from service.reload import RuntimeHolder, listen, poll
from service.routes import api_router, paths
from service.settings import Settings
from service.userstate import RedisStore

log = logging.getLogger("quiver.service")


def _pin_threads(n: int) -> None:
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def _store(settings: Settings, metrics: Metrics) -> RedisStore | None:
    if not settings.redis_url:
        return None
    return RedisStore.from_settings(settings, on_breaker_change=lambda s: metrics.redis_breaker.set(s != "closed"))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _pin_threads(settings.torch_threads)
        sched_slice.apply(settings.sched_slice_us)  # before the model process and the executor: they inherit it
        # OpenMP's thread count is per calling thread: FAISS must be told on the thread that searches.
        remote = None
        if settings.model_process:
            cpus = plan(settings.model_cpus, settings.torch_threads, settings.workers)
            remote = ModelProcess(settings.torch_threads, cpus, settings.batch_cap)
            log.info("model process CPUs: %s", "free" if cpus is None else f"{sorted(cpus.model)}, HTTP {cpus.http}")
            await remote.start()
        executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="quiver-model",
            initializer=_pin_threads,
            initargs=(settings.torch_threads,),
        )
        store = _store(settings, metrics)
        holder = RuntimeHolder(settings, metrics, also_load=remote.load if remote is not None else None)
        batcher = None
        if settings.microbatch:
            batcher = MicroBatcher(
                partial(recall_remote, metrics, remote) if remote is not None else partial(recall_batch, metrics),
                executor,
                settings.batch_cap,
                settings.batch_max_wait_ms / 1000.0,
                on_batch=metrics.batch_size.observe,
                in_flight=IN_FLIGHT if remote is not None else 1,
            )
            batcher.start()
        app.state.services = Services(settings, metrics, holder, executor, store, batcher, remote)
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
            if batcher is not None:
                await batcher.stop()
            executor.shutdown(wait=True)
            if remote is not None:
                await remote.close()
            if store is not None:
                await store.close()
            gc.unfreeze()  # what the swaps froze (service/reload.py settle_heap) is collectable again

    docs = settings.docs
    app = FastAPI(
        title="Quiver",
        summary="Two-tower candidate retrieval with optional TDM reranking",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)  # starlette's: 404 and 405 too
    app.include_router(api_router)

    endpoints = paths() | {route.path for route in app.routes if hasattr(route, "path")}  # + the docs pages
    # refuses before anything reads the body: over QUIVER_MAX_BODY_BYTES, or not in within QUIVER_BODY_TIMEOUT_S
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(CatchAll, on_error=lambda: metrics.errors.labels("unhandled").inc())
    app.add_middleware(RequestTimer, metrics=metrics, endpoints=endpoints)  # outermost: times the 413s and 500s
    return app
