"""The request flows behind the routes: user state -> user tower -> index search [-> TDM rerank] -> answer.

Each flow is handed the served `Runtime` once, at its start (service/deps.py), and uses only that object, so an
answer never mixes the versions of two triples even when a swap happens mid-request. CPU work runs on the model
thread (one thread, so torch and FAISS keep their own core threads and never oversubscribe the machine); the event
loop only parses, awaits Redis and serialises. The micro-batcher calls `recall_batch` on the runtime directly.
"""

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from fastapi import HTTPException

from index.filter import FilterError
from service.batcher import MicroBatcher
from service.metrics import Metrics
from service.model_process import ModelProcess, ModelProcessDown, Rendered
from service.reload import RuntimeHolder
from service.runtime import BatchTimings, Found, RecallJob, Runtime
from service.schemas import (
    EventsRequest,
    EventsResponse,
    FilterRange,
    RankRequest,
    RecallRequest,
    ScoredItem,
    UserInput,
)
from service.settings import Settings
from service.userstate import HISTORY_TIME_MISSING, RedisStore, StoreUnavailable, UserState, resolve

DEFAULT_EVENTS_LEN = 200  # history kept per user by /events before any model is loaded
T = TypeVar("T")


def field_error(status: int, loc: Sequence[str | int], msg: str) -> HTTPException:
    """An error in the shape of FastAPI's validation errors, naming the field."""
    return HTTPException(status, detail=[{"loc": list(loc), "msg": msg, "type": "value_error"}])


@dataclass
class Services:
    """What the flows share for the app's lifetime; built by the lifespan (service/app.py)."""

    settings: Settings
    metrics: Metrics
    holder: RuntimeHolder
    executor: ThreadPoolExecutor
    store: RedisStore | None
    batcher: MicroBatcher[Runtime, RecallJob, Found | Rendered] | None
    model_process: ModelProcess | None = None

    async def on_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


def recall_batch(metrics: Metrics, rt: Runtime, jobs: Sequence[RecallJob]) -> list[Found]:
    """Model-thread entry of a (micro-)batch."""
    hits, timings = rt.recall(jobs)
    _observe(metrics, timings)
    return hits


async def recall_remote(
    metrics: Metrics, remote: ModelProcess, rt: Runtime, jobs: Sequence[RecallJob]
) -> list[Found | Rendered]:
    """A (micro-)batch through the model process (QUIVER_MODEL_PROCESS), awaited on the event loop; the jobs that
    asked for it come back as their answer's items in JSON."""
    hits, timings = await remote.recall(rt, jobs)
    _observe(metrics, timings)
    return hits


def _observe(metrics: Metrics, timings: BatchTimings) -> None:
    metrics.stages["user_tower"].observe(timings.user_tower)
    metrics.stages["search"].observe(timings.search)


async def user_state(svc: Services, rt: Runtime, req: UserInput, tower: bool = True) -> tuple[UserState, list[str]]:
    """The user's layered state, and the `features` keys no served bundle reads (ignored, reported back).

    tower: the retriever's user tower reads this state (and, for a time-reading model, its click times)."""
    features, ignored = None, []
    if req.features:
        known = set(rt.users.columns) | set(rt.ranker_users.columns if rt.ranker_users else ())
        known.discard("user_id")
        features = {k: v for k, v in req.features.items() if k in known}
        ignored = sorted(k for k in req.features if k not in known)
    needs_time = tower and rt.reads_time
    if needs_time and req.history is not None and req.history_timestamps is None:
        raise field_error(
            422, ["body", "history_timestamps"], "required with `history`: the model reads when each item was clicked"
        )
    t0 = time.perf_counter()
    record = await svc.store.fetch(req.user_id, rt.state_len) if svc.store is not None else None
    state = resolve(req.user_id, rt.users, record, svc.store is not None, req.history, features, req.history_timestamps)
    if needs_time and state.history and state.history_time is None:
        state.degraded.append(HISTORY_TIME_MISSING)  # served as if every click happened at once
    svc.metrics.stages["feature_fetch"].observe(time.perf_counter() - t0)
    for reason in state.degraded:
        svc.metrics.degraded.labels(reason).inc()
    return state, ignored


def _answer(rt: Runtime, state: UserState, unknown: dict[str, list[str]], ignored: list[str]) -> dict[str, Any]:
    """The fields every answer shares (schemas.Answer, in its field order)."""
    model_version, index_version, ranker_version = rt.versions
    return {
        "model_version": model_version,
        "index_version": index_version,
        "ranker_version": ranker_version,
        "user_state": state.source,
        "degraded": ",".join(state.degraded) or None,
        "unknown_items": {k: v for k, v in unknown.items() if v} or None,
        "ignored_features": ignored or None,
    }


async def recall(svc: Services, rt: Runtime, req: RecallRequest) -> dict[str, Any]:
    """A RecallResponse body as a plain dict (service/responses.py says why)."""
    if req.model is not None and req.model != rt.model.name:
        raise field_error(404, ["body", "model"], f"model {req.model!r} is not loaded (serving {rt.model.name!r})")
    if req.rerank and rt.ranker is None:
        raise HTTPException(503, detail="rerank: no ranker loaded (set QUIVER_RANKER)")
    state, ignored = await user_state(svc, rt, req)
    unknown = {"history": rt.split_known(state.history)[1] if req.history else [], "exclude": []}
    exclude = list(req.exclude)
    if exclude:
        unknown["exclude"] = rt.split_known(exclude)[1]
    if req.exclude_seen:
        exclude += state.history
    fetch = max(req.k, svc.settings.rerank_candidates) if req.rerank else req.k
    flt = None
    if req.filter is not None:
        plain = {c: v.model_dump(exclude_none=True) if isinstance(v, FilterRange) else v for c, v in req.filter.items()}
        try:
            flt = rt.attributes.parse(plain)
        except FilterError as err:
            raise field_error(422, ["body", "filter", *([err.column] if err.column else [])], str(err)) from None
    job = RecallJob(state, fetch, exclude, flt, render=not req.rerank)
    found: Found | Rendered
    try:
        if svc.batcher is not None:
            found = await svc.batcher.submit(rt, job)
        elif svc.model_process is not None:
            found = (await recall_remote(svc.metrics, svc.model_process, rt, [job]))[0]
        else:
            found = (await svc.on_model_thread(recall_batch, svc.metrics, rt, [job]))[0]
    except ModelProcessDown as err:
        raise HTTPException(503, detail=f"recall: {err}") from None
    body = _answer(rt, state, unknown, ignored)
    # cached by the search that just ran
    matches = rt.passing(flt).count if flt is not None else None
    items: list[ScoredItem]
    if isinstance(found, Rendered):  # built by the model process
        return {**body, "items": orjson.Fragment(found.items_json), "filter_matches": matches}
    if not req.rerank:
        items = found.items()
        return {**body, "items": items, "filter_matches": matches}
    retrieved = {i: (s, t) for i, s, t in zip(*found, strict=True)}
    t0 = time.perf_counter()
    ranked, unscorable = await svc.on_model_thread(rt.rank, state, found.item_ids, req.k)
    svc.metrics.stages["rerank"].observe(time.perf_counter() - t0)
    items = [
        {"item_id": i, "score": s, "interest": retrieved[i][1], "retrieval_score": retrieved[i][0]} for i, s in ranked
    ]
    if unscorable:
        body["unknown_items"] = {**(body["unknown_items"] or {}), "rerank": unscorable}
    return {**body, "items": items, "filter_matches": matches}


async def rank(svc: Services, rt: Runtime, req: RankRequest) -> dict[str, Any]:
    """A RankResponse body as a plain dict."""
    if rt.ranker is None:
        raise HTTPException(503, detail="no ranker loaded (set QUIVER_RANKER)")
    state, ignored = await user_state(svc, rt, req, tower=False)
    t0 = time.perf_counter()
    ranked, unknown = await svc.on_model_thread(rt.rank, state, req.candidates, req.k)
    svc.metrics.stages["rerank"].observe(time.perf_counter() - t0)
    hist_unknown = [h for h in state.history if h not in rt.ranker.item_row] if req.history else []
    body = _answer(rt, state, {"candidates": unknown, "history": hist_unknown}, ignored)
    items: list[ScoredItem] = [{"item_id": i, "score": s} for i, s in ranked]
    return {**body, "items": items}


async def events(svc: Services, req: EventsRequest) -> EventsResponse:
    if svc.store is None:
        raise HTTPException(503, detail="events: no live user state store (set QUIVER_REDIS_URL)")
    rt = svc.holder.current
    max_len = rt.state_len if rt is not None else DEFAULT_EVENTS_LEN
    stored = rt.users.get(req.user_id) if rt is not None else None
    seed = stored[1][-max_len:] if stored else []
    seed_times = rt.users.times(req.user_id) if rt is not None and stored else None
    now = int(time.time())
    times = req.timestamps if req.timestamps is not None else [now] * len(req.items)
    try:
        done = await svc.store.append(
            req.user_id,
            req.items,
            times,
            max_len,
            seed,
            seed_times[-max_len:] if seed_times else None,
            event_id=req.event_id,
        )
    except StoreUnavailable as err:  # the store turns every Redis, socket and timeout error into this
        svc.metrics.errors.labels("events_redis").inc()
        # Refused by the open breaker, the clicks were not sent; after a timeout Redis may still have applied them,
        # and only an event_id makes the retry safe.
        refused = err.reason == "breaker_open"
        stored = "not stored" if refused else "not acknowledged, they may or may not be stored"
        retry = "retrying with the same event_id is safe" if req.event_id else "send an event_id to make retries safe"
        raise HTTPException(
            503, detail=f"events: Redis unavailable ({err.reason}), the clicks are {stored}; {retry}"
        ) from None
    unknown = rt.split_known(req.items)[1] if rt is not None else []
    return EventsResponse.model_construct(
        user_id=req.user_id, history_length=done.length, unknown_items=unknown, duplicate=done.duplicate
    )
