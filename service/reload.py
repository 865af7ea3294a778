"""Hot swap: load a new (model, index, ranker) triple beside the served one, then switch in one assignment.

In-flight requests keep the `Runtime` they took and finish on it; Python frees the old one when its last request
drops the reference. One reload runs at a time. A triple that fails verification or pairing is refused: the old one
stays served and the refusal is remembered, so the periodic check does not reload the same broken files every time.

Triggers: `POST /admin/reload`, a message on the index's Redis channel (index/publish.py announces every publish),
and a periodic look at the pointers on disk (QUIVER_RELOAD_POLL_S), which also brings up a service that started
before anything was published.
"""

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from index.publish import channel
from models.errors import QuiverError
from service.metrics import Metrics
from service.runtime import Runtime, Target, find_target, load_runtime
from service.settings import Settings

log = logging.getLogger("quiver.reload")


@dataclass
class ReloadOutcome:
    status: Literal["reloaded", "unchanged", "refused"]
    versions: tuple[str, str, str | None] | None  # what is served after the attempt
    reason: str | None = None


class RuntimeHolder:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.current: Runtime | None = None
        self._lock = asyncio.Lock()
        self._refused: tuple[str, str, str | None] | None = None
        self.last_error: str | None = None

    def _publish_metrics(self, rt: Runtime) -> None:
        loaded = [("retriever", rt.model.name, rt.model.version), ("index", rt.index.name, rt.index.version)]
        if rt.ranker is not None:
            loaded.append(("ranker", rt.ranker.bundle.name, rt.ranker.bundle.version))
        self.metrics.set_loaded(loaded, int(rt.index.index.ntotal))

    async def reload(self, force: bool = False) -> ReloadOutcome:
        async with self._lock:
            served = self.current.versions if self.current else None
            try:
                target: Target = await asyncio.to_thread(find_target, self.settings)
            except QuiverError as err:
                return self._refuse(str(err), served)
            if not force and (target.versions == served or target.versions == self._refused):
                return ReloadOutcome("unchanged", served, self.last_error if target.versions == self._refused else None)
            try:
                rt = await asyncio.to_thread(load_runtime, target)
            except (QuiverError, OSError, ValueError, KeyError, RuntimeError) as err:
                self._refused = target.versions
                reason = str(err) if isinstance(err, QuiverError) else f"{type(err).__name__}: {err}"
                return self._refuse(reason, served)
            self.current = rt  # the swap: one reference assignment
            self._refused, self.last_error = None, None
            self._publish_metrics(rt)
            self.metrics.reloads.labels("reloaded").inc()
            log.info("serving model %s, index %s, ranker %s", *rt.versions)
            return ReloadOutcome("reloaded", rt.versions)

    def _refuse(self, reason: str, served: tuple[str, str, str | None] | None) -> ReloadOutcome:
        reason = reason.replace("\n", " ")
        if reason != self.last_error:
            log.error("reload refused, still serving %s: %s", served, reason)
        self.last_error = reason
        self.metrics.reloads.labels("refused").inc()
        return ReloadOutcome("refused", served, reason)


async def poll(holder: RuntimeHolder, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        await holder.reload()


async def listen(holder: RuntimeHolder, url: str, retry_s: float = 2.0) -> None:
    """Reload on every announcement of the served index name; reconnect whenever Redis goes away."""
    name = channel(holder.settings.index_name)
    while True:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(name)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        log.info("publish announced on %s: %s", name, message.get("data"))
                        await holder.reload()
        except (RedisError, OSError) as err:
            log.debug("index channel %s: %s; retrying in %.0fs", name, err, retry_s)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
        await asyncio.sleep(retry_s)
