"""Hot swap: load a new (model, index, ranker) triple beside the served one, then switch in one assignment.

In-flight requests keep the `Runtime` they took and finish on it; Python frees the old one when its last request
drops the reference. One reload runs at a time.

Any exception while finding, loading or warming a candidate is a refusal, whatever raised it (a truncated
safetensors file raises the library's own error, not ours): the old triple stays served, the refusal is counted,
logged and remembered with its time, and a later attempt on the same versions answers "refused" again at once,
without reloading the broken files, whoever asked first (the poll, the Redis listener or /admin/reload).

Triggers: `POST /admin/reload`, a message on the index's Redis channel (index/publish.py announces every publish),
and a periodic look at the pointers on disk (QUIVER_RELOAD_POLL_S), which also brings up a service that started
before anything was published. The poll and the listener are supervised loops: an error in one round is logged and
counted (`quiver_reload_loop_errors_total`) and the loop goes on; the listener resubscribes when Redis comes back.
"""

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis

from index.publish import announcement, channel
from models.errors import QuiverError
from service.metrics import Metrics
from service.runtime import Runtime, Target, find_target, load_runtime
from service.schemas import Refusal
from service.settings import Settings

log = logging.getLogger("quiver.reload")

Versions = tuple[str, str, str | None]  # model, index, ranker


@dataclass
class ReloadOutcome:
    status: Literal["reloaded", "unchanged", "refused"]
    versions: Versions | None  # what is served after the attempt
    reason: str | None = None


def _describe(err: BaseException) -> str:
    text = str(err) if isinstance(err, QuiverError) else f"{type(err).__name__}: {err}"
    return text.replace("\n", " ")[:1000]


def settle_heap() -> None:
    """Keep the cyclic garbage collector off the loaded triple, once per swap.

    A full (generation 2) collection walks every tracked object, and a loaded triple holds a few hundred thousand of
    them: 88-95 ms per pass in a server of the 1M-item serve-bench triple, which ran ten of them in 40 s of load,
    each a pause for every request in flight (saturation p99 114 ms; 32 ms with this). Objects alive now (the new
    runtime, and the old one while its last requests finish) go to the permanent generation, which collections skip
    (then ~1.3 ms a pass); what the previous swap froze is unfrozen and collected first, so an old runtime caught in
    reference cycles is freed here rather than kept for good."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class RuntimeHolder:
    def __init__(self, settings: Settings, metrics: Metrics, also_load: Callable[[Target], None] | None = None) -> None:
        """also_load: called with every triple loaded here before it is served (the model process loads it too);
        what it raises refuses the triple like a failed load."""
        self.settings = settings
        self.metrics = metrics
        self.also_load = also_load
        self.current: Runtime | None = None
        self.refusal: Refusal | None = None  # the latest refusal, until a reload succeeds (as /readyz shows it)
        self._lock = asyncio.Lock()

    @property
    def not_serving_reason(self) -> str:
        """Why no triple is served yet: the last refusal, or the first load still running."""
        return self.refusal.reason if self.refusal is not None else "still loading"

    def _publish_metrics(self, rt: Runtime) -> None:
        loaded = [("retriever", rt.model.name, rt.model.version), ("index", rt.index.name, rt.index.version)]
        if rt.ranker is not None:
            loaded.append(("ranker", rt.ranker.bundle.name, rt.ranker.bundle.version))
        self.metrics.set_loaded(loaded, int(rt.index.index.ntotal))

    async def reload(self, force: bool = False) -> ReloadOutcome:
        """force: reload even the served or an already refused triple (after fixing files in place)."""
        async with self._lock:
            served = self.current.versions if self.current else None
            try:
                target: Target = await asyncio.to_thread(find_target, self.settings)
            except Exception as err:  # no pairable triple on disk: nothing was loaded, nothing changes
                return self._refuse(_describe(err), None, served)
            if not force and target.versions == served:
                return ReloadOutcome("unchanged", served)
            if not force and self.refusal is not None and self.refusal.versions == target.versions:
                return ReloadOutcome("refused", served, self.refusal.reason)  # already counted when it was refused
            try:
                rt = await asyncio.to_thread(self._load, target)
            except Exception as err:
                return self._refuse(_describe(err), target.versions, served)
            self.current = rt  # the swap: one reference assignment
            settle_heap()
            self.refusal = None
            self._publish_metrics(rt)
            self.metrics.reloads.labels("reloaded").inc()
            log.info("serving model %s, index %s, ranker %s", *rt.versions)
            return ReloadOutcome("reloaded", rt.versions)

    def _load(self, target: Target) -> Runtime:
        rt = load_runtime(target)
        if self.also_load is not None:
            self.also_load(target)
        return rt

    def _refuse(self, reason: str, refused: Versions | None, served: Versions | None) -> ReloadOutcome:
        again = self.refusal is not None and (self.refusal.reason, self.refusal.versions) == (reason, refused)
        if not again:  # a poll finding the same unpairable pointers every round is one refusal, not one per round
            log.error("reload refused, still serving %s: %s", served, reason)
            self.metrics.reloads.labels("refused").inc()
            self.refusal = Refusal(reason=reason, at=time.time(), versions=refused)
        return ReloadOutcome("refused", served, reason)


async def announce(holder: RuntimeHolder, versions: Versions, timeout_s: float = 1.0) -> bool:
    """Tell the other worker processes (QUIVER_WORKERS > 1) and replicas that an /admin/reload swapped this one.

    /admin/reload reaches the one process that accepted the request; the others hear it on the index channel, the
    message a publish sends, and load the same pointers (the announcing process hears it too and finds nothing new).
    A Redis that is away only delays them until their poll: a warning, never a failed reload."""
    url = holder.settings.redis_url
    if not url:
        return False
    model, index, _ = versions
    message = announcement(holder.settings.index_name, index, model)
    client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        await asyncio.wait_for(client.publish(channel(holder.settings.index_name), message), timeout_s)
    except Exception as err:
        log.warning("reloaded, but the announcement to other workers failed (%s: %s)", type(err).__name__, err)
        return False
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
    return True


async def _supervised_round(holder: RuntimeHolder, task: str) -> None:
    try:
        await holder.reload()
    except Exception:  # reload() turns load errors into refusals; this is for anything else (a bug, a disk error)
        log.exception("%s: reload round failed; the loop goes on", task)
        holder.metrics.reload_loop_errors.labels(task).inc()


async def poll(holder: RuntimeHolder, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        await _supervised_round(holder, "poll")


async def listen(holder: RuntimeHolder, url: str, retry_s: float = 1.0) -> None:
    """Reload on every announcement of the served index name; resubscribe whenever the subscription breaks.

    After a reconnect the pointers are read once, since a publish announced while the subscription was down was
    never heard."""
    name = channel(holder.settings.index_name)
    missed = False
    while True:
        client = aioredis.Redis.from_url(url, decode_responses=True)
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(name)
                if missed:
                    await _supervised_round(holder, "listen")
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        log.info("publish announced on %s: %s", name, message.get("data"))
                        await _supervised_round(holder, "listen")
        except Exception as err:  # Redis gone, a protocol error, anything: count it, wait, resubscribe
            log.warning("index channel %s: %s: %s; resubscribing in %.1fs", name, type(err).__name__, err, retry_s)
            holder.metrics.reload_loop_errors.labels("listen").inc()
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()
        missed = True
        await asyncio.sleep(retry_s)
