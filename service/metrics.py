"""Prometheus series of DESIGN §7, one registry per app (tests and benchmarks build several apps in a process).

Request durations are recorded by a plain ASGI middleware rather than per route, so that 413s, 422s and 404s
(answered before any route runs) are counted too. The endpoint label is the route's path, or "other" for paths the
app does not serve, so that a scanner cannot grow the label set.
"""

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Latency buckets for a service whose answers take milliseconds: 0.25 ms .. 2.5 s.
BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STAGES = ("feature_fetch", "user_tower", "search", "rerank")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "quiver_request_duration_seconds", "Request time by endpoint and status", ["endpoint", "status"],
            buckets=BUCKETS, registry=r,
        )  # fmt: skip
        self.stage_duration = Histogram(
            "quiver_stage_duration_seconds", "Time in each serving stage (per batch for user_tower and search)",
            ["stage"], buckets=BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "quiver_batch_size", "Requests per micro-batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.index_items = Gauge("quiver_index_items", "Items in the served index", registry=r)
        self.model_info = Gauge(
            "quiver_model_info", "Loaded bundles (value 1)", ["role", "name", "version"], registry=r
        )
        self.errors = Counter("quiver_errors_total", "Failures by kind", ["kind"], registry=r)
        self.degraded = Counter("quiver_degraded_total", "Answers served degraded, by reason", ["reason"], registry=r)
        self.reloads = Counter("quiver_reloads_total", "Reload attempts by outcome", ["outcome"], registry=r)
        self.reload_loop_errors = Counter(
            "quiver_reload_loop_errors_total", "Errors survived by the reload poll and listener", ["task"], registry=r
        )
        self.redis_breaker = Gauge(
            "quiver_redis_breaker_open", "1 while the Redis circuit breaker is open or half-open", registry=r
        )
        # bound once: `labels()` takes a lock and builds its key on every call, on the hot path of every request
        self.stages = {stage: self.stage_duration.labels(stage) for stage in STAGES}

    def set_loaded(self, loaded: Iterable[tuple[str, str, str]], index_items: int) -> None:
        """(role, name, version) of every bundle now served; the previous set is cleared."""
        self.model_info.clear()
        for role, name, version in loaded:
            self.model_info.labels(role, name, version).set(1)
        self.index_items.set(index_items)


class RequestTimer:
    """ASGI middleware: observe every HTTP request's duration and final status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, endpoints: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints
        self._series: dict[tuple[str, int], Histogram] = {}  # (endpoint, status) -> its bound series

    def _observe(self, endpoint: str, status: int, seconds: float) -> None:
        series = self._series.get((endpoint, status))
        if series is None:
            series = self._series[(endpoint, status)] = self.metrics.request_duration.labels(endpoint, str(status))
        series.observe(seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            # the matched route's template (FastAPI puts the route in the scope), so /items/{item_id} is one label
            template = getattr(scope.get("route"), "path", None)
            path = template if isinstance(template, str) else scope["path"]
            endpoint = path if path in self.endpoints else "other"
            self._observe(endpoint, status, time.perf_counter() - start)
