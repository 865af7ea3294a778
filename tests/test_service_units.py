"""Pieces of the service without HTTP: state layering, the micro-batcher, settings from the environment."""

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest

from service.batcher import MicroBatcher
from service.settings import Settings
from service.userstate import BundleUsers, RedisRecord, resolve

USERS = pa.table(
    {
        "user_id": ["a", "b"],
        "region": ["r1", "r2"],
        "history": pa.array([["i1", "i2"], []], pa.list_(pa.string())),
    }
)


@pytest.fixture
def users() -> BundleUsers:
    return BundleUsers(USERS, ["region"])


def test_layers_request_over_redis_over_bundle(users: BundleUsers) -> None:
    redis = RedisRecord({"region": "r9", "unrelated": "x"}, ["i7"])
    s = resolve("a", users, redis, True, None, None)
    assert (s.profile, s.history, s.source, s.degraded) == ({"region": "r9", "user_id": "a"}, ["i7"], "redis", [])
    s = resolve("a", users, redis, True, ["i3"], {"region": "r0"})
    assert (s.profile["region"], s.history, s.source) == ("r0", ["i3"], "request")
    s = resolve("a", users, RedisRecord({}, None), True, None, None)  # Redis knows nothing: the bundle's state
    assert (s.profile["region"], s.history, s.source) == ("r1", ["i1", "i2"], "bundle")


def test_redis_down_and_unknown_users_are_flagged(users: BundleUsers) -> None:
    s = resolve("a", users, None, True, None, None)
    assert (s.history, s.source, s.degraded) == (["i1", "i2"], "bundle", ["redis_unavailable"])
    s = resolve("zz", users, None, True, None, None)
    assert s.popularity_only and s.degraded == ["redis_unavailable", "popularity_fallback"]
    s = resolve("zz", users, None, False, None, None)
    assert s.popularity_only and s.degraded == ["popularity_fallback"]
    s = resolve("zz", users, None, False, [], {"region": "r1"})  # described by the request: personalised
    assert not s.popularity_only and s.degraded == []
    s = resolve("b", users, None, False, None, None)  # known, empty history: the tower still has the profile
    assert not s.popularity_only and s.source == "bundle"


def test_microbatcher_batches_concurrent_jobs_and_splits_by_owner() -> None:
    calls: list[tuple[str, list[int]]] = []
    release = threading.Event()

    def run(owner: str, jobs: Sequence[int]) -> list[int]:
        release.wait(5)
        calls.append((owner, list(jobs)))
        return [j * 10 for j in jobs]

    async def main() -> list[int]:
        with ThreadPoolExecutor(1) as pool:
            b: MicroBatcher[str, int, int] = MicroBatcher(run, pool, max_size=4, max_wait_s=0.05)
            b.start()
            first = asyncio.create_task(b.submit("old", 0))  # occupies the model thread
            await asyncio.sleep(0.1)
            rest = [asyncio.create_task(b.submit("old" if j < 4 else "new", j)) for j in range(1, 7)]
            await asyncio.sleep(0.05)
            release.set()
            out = await asyncio.gather(first, *rest)
            await b.stop()
            return out

    assert asyncio.run(main()) == [0, 10, 20, 30, 40, 50, 60]
    assert calls[0] == ("old", [0])
    assert calls[1] == ("old", [1, 2, 3])  # one batch of 4 (max_size), split by owner
    assert calls[2] == ("new", [4])
    assert calls[3] == ("new", [5, 6])
    assert all(len(jobs) <= 4 for _, jobs in calls)


def test_microbatcher_failure_fails_only_its_batch() -> None:
    def run(owner: str, jobs: Sequence[int]) -> list[int]:
        if 13 in jobs:
            raise ValueError("bad luck")
        return list(jobs)

    async def main() -> tuple[object, int]:
        with ThreadPoolExecutor(1) as pool:
            b: MicroBatcher[str, int, int] = MicroBatcher(run, pool, max_size=1, max_wait_s=0)
            b.start()
            bad = await asyncio.gather(b.submit("x", 13), return_exceptions=True)
            good = await b.submit("x", 7)
            await b.stop()
            return bad[0], good

    bad, good = asyncio.run(main())
    assert isinstance(bad, ValueError) and good == 7


def test_settings_come_from_quiver_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUIVER_MODEL", "mind_beauty")
    monkeypatch.setenv("QUIVER_REDIS_TIMEOUT_MS", "25")
    monkeypatch.setenv("QUIVER_ADMIN_TOKEN", "hunter2-token")
    s = Settings()
    assert (s.model, s.index_name, s.redis_timeout_ms) == ("mind_beauty", "mind_beauty", 25.0)
    assert "hunter2" not in repr(s) and s.admin_token is not None  # the token is a secret
    monkeypatch.setenv("QUIVER_BATCH_MAX_SIZE", "0")
    with pytest.raises(ValueError, match="batch_max_size"):
        Settings()


def test_the_batch_cap_defaults_by_layout_and_follows_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUIVER_MODEL", "dssm")
    assert Settings().batch_cap == 64  # the model thread: the GIL serialises the stages anyway
    monkeypatch.setenv("QUIVER_MODEL_PROCESS", "true")
    assert Settings().batch_cap == 8  # two processes overlap only with batches that leave requests for the other
    monkeypatch.setenv("QUIVER_BATCH_MAX_SIZE", "24")
    assert Settings().batch_cap == 24
    monkeypatch.setenv("QUIVER_MODEL_PROCESS", "false")
    assert Settings().batch_cap == 24
