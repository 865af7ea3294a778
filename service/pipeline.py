"""The request flows behind the routes: user state -> user tower -> index search [-> TDM rerank] -> answer.

Each flow takes the served `Runtime` once, at its start, and uses only that object, so an answer never mixes the
versions of two triples even when a swap happens mid-request. CPU work runs on the model thread (one thread, so
torch and FAISS keep their own core threads and never oversubscribe the machine); the event loop only parses,
awaits Redis and serialises.
"""

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException
from redis.exceptions import RedisError

from service.batcher import MicroBatcher
from service.metrics import Metrics
from service.reload import RuntimeHolder
from service.runtime import Found, RecallJob, Runtime
from service.schemas import EventsRequest, RankRequest, RecallRequest, UserInput
from service.settings import Settings
from service.userstate import HISTORY_TIME_MISSING, RedisStore, UserState, resolve

DEFAULT_EVENTS_LEN = 200  # history kept per user by /events before any model is loaded


def field_error(status: int, loc: Sequence[str | int], msg: str) -> HTTPException:
    """An error in the shape of FastAPI's validation errors, naming the field."""
    return HTTPException(status, detail=[{"loc": list(loc), "msg": msg, "type": "value_error"}])


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    holder: RuntimeHolder
    executor: ThreadPoolExecutor
    store: RedisStore | None
    batcher: MicroBatcher[Runtime, RecallJob, Found] | None

    def runtime(self) -> Runtime:
        rt = self.holder.current
        if rt is None:
            reason = self.holder.last_error or "still loading"
            raise HTTPException(503, detail=f"no model loaded: {reason}")
        return rt

    def run_recall(self, rt: Runtime, jobs: Sequence[RecallJob]) -> list[Found]:
        """Model-thread entry of a (micro-)batch."""
        hits, timings = rt.recall(jobs)
        self.metrics.stage_duration.labels("user_tower").observe(timings.user_tower)
        self.metrics.stage_duration.labels("search").observe(timings.search)
        return hits

    async def _on_model_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def user_state(self, rt: Runtime, req: UserInput, tower: bool = True) -> UserState:
        """tower: the retriever's user tower reads this state (and, for a time-reading model, its click times)."""
        if req.features:
            allowed = set(rt.users.columns) | set(rt.ranker_users.columns if rt.ranker_users else ())
            for key in req.features:
                if key not in allowed or key == "user_id":
                    fields = ", ".join(sorted(allowed - {"user_id"})) or "none"
                    raise field_error(422, ["body", "features", key], f"not a profile field (fields: {fields})")
        needs_time = tower and rt.reads_time
        if needs_time and req.history is not None and req.history_timestamps is None:
            raise field_error(
                422,
                ["body", "history_timestamps"],
                "required with `history`: the model reads when each item was clicked",
            )
        t0 = time.perf_counter()
        record = await self.store.fetch(req.user_id, rt.state_len) if self.store is not None else None
        state = resolve(
            req.user_id, rt.users, record, self.store is not None, req.history, req.features, req.history_timestamps
        )
        if needs_time and state.history and state.history_time is None:
            state.degraded.append(HISTORY_TIME_MISSING)  # served as if every click happened at once
        self.metrics.stage_duration.labels("feature_fetch").observe(time.perf_counter() - t0)
        for reason in state.degraded:
            self.metrics.degraded.labels(reason).inc()
        return state

    @staticmethod
    def _answer(rt: Runtime, state: UserState, unknown: dict[str, list[str]]) -> dict[str, Any]:
        model_version, index_version, ranker_version = rt.versions
        return {
            "model_version": model_version,
            "index_version": index_version,
            "ranker_version": ranker_version,
            "user_state": state.source,
            "degraded": ",".join(state.degraded) or None,
            "unknown_items": {k: v for k, v in unknown.items() if v} or None,
        }

    async def recall(self, req: RecallRequest) -> dict[str, Any]:
        rt = self.runtime()
        if req.model is not None and req.model != rt.model.name:
            raise field_error(404, ["body", "model"], f"model {req.model!r} is not loaded (serving {rt.model.name!r})")
        if req.rerank and rt.ranker is None:
            raise HTTPException(503, detail="rerank: no ranker loaded (set QUIVER_RANKER)")
        state = await self.user_state(rt, req)
        unknown = {"history": rt.split_known(state.history)[1] if req.history else [], "exclude": []}
        exclude = list(req.exclude)
        if exclude:
            unknown["exclude"] = rt.split_known(exclude)[1]
        if req.exclude_seen:
            exclude += state.history
        fetch = max(req.k, self.settings.rerank_candidates) if req.rerank else req.k
        job = RecallJob(state, fetch, exclude)
        if self.batcher is not None:
            found = await self.batcher.submit(rt, job)
        else:
            found = (await self._on_model_thread(self.run_recall, rt, [job]))[0]
        body = self._answer(rt, state, unknown)
        if not req.rerank:
            body["items"] = [{"item_id": i, "score": s, "interest": t} for i, s, t in zip(*found, strict=True)]
            return body
        retrieved = {i: (s, t) for i, s, t in zip(*found, strict=True)}
        t0 = time.perf_counter()
        ranked, unscorable = await self._on_model_thread(rt.rank, state, found.item_ids, req.k)
        self.metrics.stage_duration.labels("rerank").observe(time.perf_counter() - t0)
        body["items"] = [
            {"item_id": i, "score": s, "interest": retrieved[i][1], "retrieval_score": retrieved[i][0]}
            for i, s in ranked
        ]
        if unscorable:
            body["unknown_items"] = {**(body["unknown_items"] or {}), "rerank": unscorable}
        return body

    async def rank(self, req: RankRequest) -> dict[str, Any]:
        rt = self.runtime()
        if rt.ranker is None:
            raise HTTPException(503, detail="no ranker loaded (set QUIVER_RANKER)")
        state = await self.user_state(rt, req, tower=False)
        t0 = time.perf_counter()
        ranked, unknown = await self._on_model_thread(rt.rank, state, req.candidates, req.k)
        self.metrics.stage_duration.labels("rerank").observe(time.perf_counter() - t0)
        hist_unknown = [h for h in state.history if h not in rt.ranker.item_row] if req.history else []
        body = self._answer(rt, state, {"candidates": unknown, "history": hist_unknown})
        body["items"] = [{"item_id": i, "score": s} for i, s in ranked]
        return body

    async def events(self, req: EventsRequest) -> dict[str, Any]:
        if self.store is None:
            raise HTTPException(503, detail="events: no live user state store (set QUIVER_REDIS_URL)")
        rt = self.holder.current
        max_len = rt.state_len if rt is not None else DEFAULT_EVENTS_LEN
        stored = rt.users.get(req.user_id) if rt is not None else None
        seed = stored[1][-max_len:] if stored else []
        seed_times = rt.users.times(req.user_id) if rt is not None and stored else None
        now = int(time.time())
        times = req.timestamps if req.timestamps is not None else [now] * len(req.items)
        try:
            n = await self.store.append(
                req.user_id, req.items, times, max_len, seed, seed_times[-max_len:] if seed_times else None
            )
        except (RedisError, OSError, TimeoutError) as err:
            self.metrics.errors.labels("events_redis").inc()
            raise HTTPException(503, detail=f"events: not stored, Redis unavailable ({type(err).__name__})") from None
        unknown = rt.split_known(req.items)[1] if rt is not None else []
        return {"user_id": req.user_id, "history_length": n, "unknown_items": unknown}
