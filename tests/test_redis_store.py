"""RedisStore against a real redis-server: idempotent appends, key TTLs, and the circuit breaker (unit rules with a
fake clock, then the real store with Redis stalled, frozen, stopped and restarted)."""

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from service.breaker import CircuitBreaker, State
from service.userstate import (
    Appended,
    RedisStore,
    StoreUnavailable,
    hist_key,
    hist_time_key,
    seen_key,
    user_key,
)
from tests.conftest import RedisProcess

# Holds the server for `ms` milliseconds, as a slow command or a stalled Redis would: every other client waits.
_BUSY_LUA = """
local t0 = redis.call('TIME')
local start = tonumber(t0[1]) * 1000000 + tonumber(t0[2])
while true do
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000000 + tonumber(t[2]) - start >= tonumber(ARGV[1]) * 1000 then return 1 end
end
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _user() -> str:
    return f"u-{uuid.uuid4().hex[:12]}"


def _run(scenario: Callable[[RedisStore], Awaitable[None]], url: str, timeout_ms: float = 1000.0, **kw: Any) -> None:
    """Runs `scenario` with a store built inside the event loop it lives on (its pool is bound to that loop)."""

    async def main() -> None:
        store = RedisStore(url, timeout_ms, 8, **kw)
        try:
            await scenario(store)
        finally:
            await store.close()

    asyncio.run(main())


class Stall:
    """Another client runs a busy script: Redis answers nobody else for `ms` milliseconds."""

    def __init__(self, url: str, ms: int) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=30)
        self.client.ping()  # connected before the stall starts, so it starts on time
        self.thread = threading.Thread(target=self.client.eval, args=(_BUSY_LUA, 0, ms))

    async def __aenter__(self) -> "Stall":
        self.thread.start()
        await asyncio.sleep(0.1)  # the script is running
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.thread.join)
        self.client.close()


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        yield client


# ------------------------------------------------------------------------------------------------- idempotent appends


def test_a_retried_event_id_is_stored_once(redis_url: str, r: redis.Redis) -> None:
    user = _user()

    async def scenario(store: RedisStore) -> None:
        first = await store.append(user, ["a", "b"], [1, 2], 20, [], event_id="e1")
        again = await store.append(user, ["a", "b"], [1, 2], 20, [], event_id="e1")
        other = await store.append(user, ["c"], [3], 20, [], event_id="e2")
        no_id = await store.append(user, ["d"], [4], 20, [])
        assert (first, again, other, no_id) == (
            Appended(2, False),
            Appended(2, True),
            Appended(3, False),
            Appended(4, False),
        )
        assert await store.append(_user(), ["x"], [1], 20, [], event_id="e1") == Appended(1, False)  # per user
        with pytest.raises(ValueError):
            await store.append(user, ["a"], [1], 20, [], event_id="")

    _run(scenario, redis_url)
    assert r.lrange(hist_key(user), 0, -1) == ["d", "c", "b", "a"]
    assert r.lrange(hist_time_key(user), 0, -1) == ["4", "3", "2", "1"]


def test_a_duplicate_keeps_the_seed_and_times_aligned(redis_url: str, r: redis.Redis) -> None:
    user = _user()

    async def scenario(store: RedisStore) -> None:
        assert await store.append(user, ["c"], [30], 20, ["a", "b"], [10, 20], event_id="e") == Appended(3, False)
        assert await store.append(user, ["c"], [30], 20, ["a", "b"], [10, 20], event_id="e") == Appended(3, True)
        record = await store.fetch(user, 20)
        assert record is not None and (record.history, record.history_time) == (["a", "b", "c"], [10, 20, 30])

    _run(scenario, redis_url)


def test_the_seen_window_is_bounded(redis_url: str, r: redis.Redis) -> None:
    user = _user()

    async def scenario(store: RedisStore) -> None:
        for n in range(4):  # at most 3 ids kept: e0 is forgotten
            await store.append(user, [f"i{n}"], [n], 50, [], event_id=f"e{n}")
        assert r.zrange(seen_key(user), 0, -1) == ["e1", "e2", "e3"]
        assert await store.append(user, ["i0"], [0], 50, [], event_id="e0") == Appended(5, False)  # appended again
        assert (await store.append(user, ["i3"], [3], 50, [], event_id="e3")).duplicate
        # An id older than the window is forgotten too (its arrival moved 2 windows back, as if it were that old).
        r.zadd(seen_key(user), {"e3": float(r.time()[0]) - 2 * store.event_id_window_s}, xx=True)
        assert await store.append(user, ["i3"], [3], 50, [], event_id="e3") == Appended(6, False)

    _run(scenario, redis_url, event_id_max=3, event_id_window_s=60)
    assert r.lrange(hist_key(user), 0, -1) == ["i3", "i0", "i3", "i2", "i1", "i0"]


def test_a_timed_out_append_is_safe_to_retry(redis_url: str, r: redis.Redis) -> None:
    """The reply is cut at 50 ms but the script runs once Redis is free again: the retry must not store it twice."""
    user = _user()

    async def scenario(store: RedisStore) -> None:
        await store.append(_user(), ["warm"], [1], 20, [], event_id="w")  # connection warm, script cached
        async with Stall(redis_url, 300):
            t0 = time.perf_counter()
            with pytest.raises(StoreUnavailable) as err:
                await store.append(user, ["click"], [7], 20, ["old"], [1], event_id="batch-1")
            assert err.value.reason == "timeout" and time.perf_counter() - t0 < 0.25
            assert isinstance(err.value, OSError)  # what callers already treat as "Redis unavailable"
        retried = await store.append(user, ["click"], [7], 20, ["old"], [1], event_id="batch-1")
        assert retried == Appended(2, True)  # the timed-out call did store it; the retry stored nothing more

    _run(scenario, redis_url, timeout_ms=50.0)
    assert r.lrange(hist_key(user), 0, -1) == ["click", "old"]
    assert r.lrange(hist_time_key(user), 0, -1) == ["7", "1"]


# --------------------------------------------------------------------------------------------------------------- TTL


def test_writes_set_and_refresh_the_state_ttl(redis_url: str, r: redis.Redis) -> None:
    user = _user()
    keys = [hist_key(user), hist_time_key(user), seen_key(user), user_key(user)]
    r.hset(user_key(user), mapping={"region": "r1"})

    async def scenario(store: RedisStore) -> None:
        await store.append(user, ["a"], [1], 20, [], event_id="e1")
        assert all(0 < r.ttl(k) <= 100 for k in keys), [r.ttl(k) for k in keys]
        for k in keys:
            r.expire(k, 5)
        await store.append(user, ["b"], [2], 20, [], event_id="e2")
        assert all(5 < r.ttl(k) <= 100 for k in keys), [r.ttl(k) for k in keys]
        for k in keys:
            r.expire(k, 5)
        assert (await store.append(user, ["b"], [2], 20, [], event_id="e2")).duplicate  # a retry refreshes too
        assert all(5 < r.ttl(k) <= 100 for k in keys), [r.ttl(k) for k in keys]

    _run(scenario, redis_url, state_ttl_s=100)


def test_a_zero_ttl_leaves_the_state_persistent(redis_url: str, r: redis.Redis) -> None:
    user = _user()
    r.hset(user_key(user), mapping={"region": "r1"})

    async def scenario(store: RedisStore) -> None:
        await store.append(user, ["a"], [1], 20, ["s"], event_id="e1")

    _run(scenario, redis_url, state_ttl_s=0, event_id_window_s=600)
    assert [r.ttl(k) for k in (hist_key(user), hist_time_key(user), user_key(user))] == [-1, -1, -1]
    assert 0 < r.ttl(seen_key(user)) <= 600  # its ids are all forgotten after the window anyway


def test_the_ttl_defaults_to_30_days(redis_url: str, r: redis.Redis) -> None:
    user = _user()

    async def scenario(store: RedisStore) -> None:
        await store.append(user, ["a"], [1], 20, [])

    _run(scenario, redis_url)
    assert 30 * 86400 - 60 < r.ttl(hist_key(user)) <= 30 * 86400


# ------------------------------------------------------------------------------------------- breaker rules (no Redis)


def _breaker(failures: int = 3, open_s: float = 1.0) -> tuple[CircuitBreaker, FakeClock, list[State]]:
    clock, seen = FakeClock(), []
    return CircuitBreaker(failures, open_s, clock=clock, on_change=seen.append), clock, seen


def test_breaker_opens_after_n_consecutive_failures() -> None:
    b, _, seen = _breaker(3)
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state == "closed" and b.allow()
    b.failure()
    assert b.state == "open" and not b.allow() and seen == ["open"]


def test_a_success_in_between_resets_the_count() -> None:
    b, _, seen = _breaker(3)
    for outcome in ("f", "f", "s", "f", "f"):
        assert b.allow()
        b.failure() if outcome == "f" else b.success()
    assert b.state == "closed" and b.consecutive_failures == 2 and seen == []


def test_half_open_lets_exactly_one_probe_through_and_closes_on_its_success() -> None:
    b, clock, seen = _breaker(1, open_s=1.0)
    b.failure()
    clock.advance(0.99)
    assert b.state == "open" and not b.allow()
    clock.advance(0.01)
    assert b.state == "half_open"
    assert b.allow()  # the probe
    assert not b.allow() and not b.allow()  # everyone else while it is out
    b.success()
    assert b.state == "closed" and b.allow() and b.allow()
    assert seen == ["open", "half_open", "closed"]


def test_a_failed_probe_reopens_for_another_period() -> None:
    b, clock, seen = _breaker(2, open_s=1.0)
    b.failure()
    b.failure()
    clock.advance(1.0)
    assert b.allow()
    b.failure()  # a single failure suffices in half-open
    assert b.state == "open" and not b.allow()
    clock.advance(0.5)
    assert not b.allow()
    clock.advance(0.5)
    assert b.allow() and not b.allow()
    assert seen == ["open", "half_open", "open", "half_open"]


def test_an_abandoned_probe_hands_its_turn_on_and_late_failures_do_not_extend_open() -> None:
    b, clock, _ = _breaker(1, open_s=1.0)
    b.failure()
    clock.advance(0.5)
    b.failure()  # a call let through before the breaker opened, failing late
    clock.advance(0.5)
    assert b.allow()
    b.abandon()  # its caller was cancelled
    assert b.allow() and not b.allow()


# -------------------------------------------------------------------------------------------- breaker with real Redis


def _connections(client: redis.Redis) -> int:
    return int(client.info("stats")["total_connections_received"])


def test_the_breaker_with_a_real_redis(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path).start()
    clock, transitions = FakeClock(), []
    breaker = CircuitBreaker(3, 5.0, clock=clock, on_change=transitions.append)
    user = _user()
    timeout_s = 0.05

    async def degraded_fast(store: RedisStore, calls: int) -> None:
        for _ in range(calls):
            t0 = time.perf_counter()
            assert await store.fetch(user, 20) is None
            assert time.perf_counter() - t0 < timeout_s / 5  # not attempted: no timeout paid
        assert not await store.ping()

    async def scenario(store: RedisStore) -> None:
        assert await store.append(user, ["a"], [1], 20, [], event_id="e1") == Appended(1, False)

        # One slow call degrades only itself: the next fetch reads Redis again.
        async with Stall(server.url, 300):
            assert await store.fetch(user, 20) is None
        assert breaker.state == "closed" and breaker.consecutive_failures == 1
        record = await store.fetch(user, 20)
        assert record is not None and record.history == ["a"] and breaker.consecutive_failures == 0

        # A hung Redis (process frozen): each of N calls pays the timeout, then the breaker opens and no call does.
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            for _ in range(3):
                t0 = time.perf_counter()
                assert await store.fetch(user, 20) is None
                assert time.perf_counter() - t0 >= timeout_s * 0.9
            assert breaker.state == "open"
            await degraded_fast(store, 20)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)

        # Dead Redis: the probe after open_s fails and reopens.
        server.stop()
        clock.advance(5.0)
        assert breaker.state == "half_open"
        assert await store.fetch(user, 20) is None
        assert breaker.state == "open"

        # Redis back, breaker still open: nothing touches Redis until open_s has passed.
        server.start()  # same port, empty (no persistence)
        with redis.Redis.from_url(server.url) as watcher:
            before = _connections(watcher)
            await degraded_fast(store, 20)
            assert _connections(watcher) == before
        clock.advance(5.0)
        assert await store.fetch(user, 20) is not None  # the probe closes it
        assert breaker.state == "closed"

        # Read-your-writes: an append that succeeds as the probe closes the breaker, so the next fetch reads it.
        server.stop()
        for _ in range(3):
            assert await store.fetch(user, 20) is None
        assert breaker.state == "open"
        server.start()
        # Writes are not shed by the open breaker (a click refused while Redis is back would be a needless 503):
        # it reaches Redis, and its success closes the breaker at once, with no probe and no wait.
        assert breaker.state == "open"
        assert await store.append(user, ["b"], [2], 20, [], event_id="e2") == Appended(1, False)
        assert breaker.state == "closed"
        record = await store.fetch(user, 20)
        assert record is not None and record.history == ["b"]

    try:
        _run(scenario, server.url, timeout_ms=timeout_s * 1000, breaker=breaker)
    finally:
        server.stop()
    assert transitions == ["open", "half_open", "open", "half_open", "closed", "open", "closed"]


def test_a_probe_that_is_out_keeps_other_callers_degraded(tmp_path: Path) -> None:
    """Half-open with Redis still stalled: one caller pays the timeout, the concurrent ones are refused at once."""
    server = RedisProcess(tmp_path).start()
    clock = FakeClock()
    breaker = CircuitBreaker(1, 1.0, clock=clock)

    async def scenario(store: RedisStore) -> None:
        assert await store.ping()
        async with Stall(server.url, 400):
            assert await store.fetch("u", 5) is None
            assert breaker.state == "open"
            clock.advance(1.0)

            async def timed() -> float:
                t0 = time.perf_counter()
                assert await store.fetch("u", 5) is None
                return time.perf_counter() - t0

            took = sorted(await asyncio.gather(*(timed() for _ in range(5))))
            assert took[-1] >= 0.045 and all(t < 0.02 for t in took[:-1]), took
            assert breaker.state == "open"
        clock.advance(1.0)
        assert await store.fetch("u", 5) is not None and breaker.state == "closed"

    try:
        _run(scenario, server.url, timeout_ms=50.0, breaker=breaker)
    finally:
        server.stop()


def test_from_settings_reads_the_new_knobs(redis_url: str) -> None:
    from service.settings import Settings

    s = Settings(
        redis_url=redis_url,
        redis_breaker_failures=7,
        redis_breaker_open_s=2.5,
        state_ttl_s=10,
        event_id_window_s=20,
        event_id_max=30,
    )
    changes: list[State] = []

    async def main() -> None:
        store = RedisStore.from_settings(s, on_breaker_change=changes.append)
        try:
            assert (store.breaker.failures, store.breaker.open_s) == (7, 2.5)
            assert (store.state_ttl_s, store.event_id_window_s, store.event_id_max) == (10, 20, 30)
            assert store.breaker.on_change is not None and await store.ping()
        finally:
            await store.close()

    asyncio.run(main())
    defaults = Settings()
    assert (defaults.redis_breaker_failures, defaults.redis_breaker_open_s) == (5, 0.1)
    assert (defaults.state_ttl_s, defaults.event_id_window_s, defaults.event_id_max) == (2_592_000, 86_400, 10_000)
