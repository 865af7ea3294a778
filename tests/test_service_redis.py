"""User state in a real redis-server: events, profile overrides, and Redis going down, hanging and coming back."""

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from models.bundle import load_bundle
from service.userstate import hist_key, hist_time_key, seen_key, user_key
from tests.conftest import RedisProcess
from tests.serving import Tree, running, settings


@pytest.fixture(scope="module")
def bundle(serving_tree: Tree):
    return load_bundle(serving_tree.root / "models" / "tiny" / serving_tree.models[1])


@pytest.fixture(scope="module")
def live(serving_tree: Tree, redis_url: str) -> Iterator[tuple[httpx.Client, redis.Redis]]:
    with (
        running(settings(serving_tree, redis_url=redis_url)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
        redis.Redis.from_url(redis_url, decode_responses=True) as r,
    ):
        yield client, r


def _user(bundle, row: int) -> tuple[str, list[str]]:
    rec = bundle.users.slice(row, 1).to_pylist()[0]
    return str(rec["user_id"]), [str(x) for x in rec["history"]]


def test_events_then_recall_sees_the_click(live, bundle) -> None:
    client, r = live
    user_id, history = _user(bundle, 20)
    before = client.post("/recall", json={"user_id": user_id, "k": 10}).json()
    assert before["user_state"] == "bundle"  # Redis has nothing for this user yet: the bundle's history
    clicked = before["items"][0]["item_id"]
    ev = client.post("/events", json={"user_id": user_id, "items": [clicked, "brand-new-item"]})
    assert ev.status_code == 200
    assert ev.json()["unknown_items"] == ["brand-new-item"]
    stored = r.lrange(hist_key(user_id), 0, -1)  # newest first; the bundle history was kept under the clicks
    assert stored[:2] == ["brand-new-item", clicked]
    assert stored[2:] == list(reversed(history))[: len(stored) - 2]
    assert ev.json()["history_length"] == len(stored)
    after = client.post("/recall", json={"user_id": user_id, "k": 10}).json()
    assert after["user_state"] == "redis" and after["degraded"] is None
    assert clicked not in [i["item_id"] for i in after["items"]]  # seen now, so excluded
    replayed = [*history, clicked, "brand-new-item"]
    replay = client.post("/recall", json={"user_id": user_id, "k": 10, "history": replayed})
    assert [i["item_id"] for i in replay.json()["items"]] == [i["item_id"] for i in after["items"]]


def test_events_trim_to_the_model_history_length(live) -> None:
    client, r = live
    items = [f"i{n:03d}" for n in range(60)]
    for chunk in (items[:25], items[25:]):
        assert client.post("/events", json={"user_id": "fresh-user", "items": chunk}).status_code == 200
    stored = r.lrange(hist_key("fresh-user"), 0, -1)
    assert len(stored) == 20  # tiny config: max_seq_len 20; the TDM reads at most 20 too
    assert stored == list(reversed(items))[:20]
    body = client.post("/recall", json={"user_id": "fresh-user", "k": 5}).json()
    assert body["user_state"] == "redis" and body["degraded"] is None


def test_redis_profile_fields_override_the_bundle(live, bundle) -> None:
    client, r = live
    user_id = _user(bundle, 30)[0]
    region = bundle.users["region"][30].as_py()
    base = client.post("/recall", json={"user_id": user_id, "k": 10}).json()
    r.hset(user_key(user_id), mapping={"region": "r_other" if region != "r_other" else "r1", "not_a_field": "x"})
    moved = client.post("/recall", json={"user_id": user_id, "k": 10}).json()
    assert [i["score"] for i in moved["items"]] != [i["score"] for i in base["items"]]
    r.delete(user_key(user_id))
    back = client.post("/recall", json={"user_id": user_id, "k": 10}).json()
    assert [i["item_id"] for i in back["items"]] == [i["item_id"] for i in base["items"]]


def test_redis_stopped_then_restarted(serving_tree: Tree, bundle, tmp_path: Path) -> None:
    server = RedisProcess(tmp_path).start()
    user_id = _user(bundle, 40)[0]
    try:
        with running(settings(serving_tree, redis_url=server.url, redis_timeout_ms=100)) as url:
            client = httpx.Client(base_url=url, timeout=30)
            assert client.post("/events", json={"user_id": user_id, "items": ["i005"]}).status_code == 200
            healthy = client.post("/recall", json={"user_id": user_id, "k": 10}).json()
            assert healthy["user_state"] == "redis" and healthy["degraded"] is None
            server.stop()
            down = client.post("/recall", json={"user_id": user_id, "k": 10})
            assert down.status_code == 200
            assert down.json()["degraded"] == "redis_unavailable" and down.json()["user_state"] == "bundle"
            assert len(down.json()["items"]) == 10
            unknown = client.post("/recall", json={"user_id": "nobody-at-all", "k": 10}).json()
            assert unknown["degraded"] == "redis_unavailable,popularity_fallback" and len(unknown["items"]) == 10
            ev = client.post("/events", json={"user_id": user_id, "items": ["i006"]})
            assert ev.status_code == 503 and "send an event_id to make retries safe" in ev.json()["detail"]
            ready = client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["redis"] == "degraded"
            server.start()  # same port; the history written before the stop is gone (no persistence)
            deadline = time.monotonic() + 10
            while True:
                body = client.post("/recall", json={"user_id": user_id, "k": 10}).json()
                if body["degraded"] is None or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert body["degraded"] is None and body["user_state"] == "bundle"
            assert client.get("/readyz").json()["redis"] == "ok"
            assert client.post("/events", json={"user_id": user_id, "items": ["i006"]}).status_code == 200
            # read-your-writes: the /recall right after an acknowledged click reads it from Redis
            assert client.post("/recall", json={"user_id": user_id, "k": 10}).json()["user_state"] == "redis"
            text = client.get("/metrics").text
            assert 'quiver_degraded_total{reason="redis_unavailable"}' in text
            client.close()
    finally:
        server.stop()


def test_a_hanging_redis_costs_at_most_the_timeout(serving_tree: Tree, bundle, tmp_path: Path) -> None:
    """DEBUG SLEEP blocks the real server; the request must come back degraded within its budget."""
    server = RedisProcess(tmp_path, "--enable-debug-command", "yes").start()
    user_id = _user(bundle, 41)[0]
    try:
        with running(settings(serving_tree, redis_url=server.url, redis_timeout_ms=50)) as url:
            client = httpx.Client(base_url=url, timeout=30)
            client.post("/recall", json={"user_id": user_id, "k": 5})  # connection pool warm
            blocker = threading.Thread(
                target=lambda: redis.Redis.from_url(server.url).execute_command("DEBUG", "SLEEP", "2")
            )
            blocker.start()
            time.sleep(0.2)
            t0 = time.perf_counter()
            slow = client.post("/recall", json={"user_id": user_id, "k": 5})
            took = time.perf_counter() - t0
            assert slow.status_code == 200 and slow.json()["degraded"] == "redis_unavailable"
            assert took < 1.0, took  # the 2 s hang was cut at the 50 ms budget (plus serving time)
            blocker.join()
            client.close()
    finally:
        server.stop()


def _stall(url: str, seconds: float) -> threading.Thread:
    """Block the real server (DEBUG SLEEP) from another connection, the way a slow command or a fork would."""
    blocker = threading.Thread(target=lambda: redis.Redis.from_url(url).execute_command("DEBUG", "SLEEP", seconds))
    blocker.start()
    time.sleep(0.05)  # the sleep has begun
    return blocker


@pytest.fixture
def debug_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path, "--enable-debug-command", "yes").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tight(serving_tree: Tree, debug_redis: RedisProcess) -> Iterator[httpx.Client]:
    """The service over the stallable Redis with a 50 ms budget per call."""
    with (
        running(settings(serving_tree, redis_url=debug_redis.url, redis_timeout_ms=50)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        yield client


def test_an_events_retry_after_a_timeout_stores_the_click_once(
    tight: httpx.Client, bundle, debug_redis: RedisProcess
) -> None:
    """The probe's case: Redis stalled 300 ms on a warm connection, the 503 went out while the click was stored."""
    user_id, client = _user(bundle, 42)[0], tight
    with redis.Redis.from_url(debug_redis.url, decode_responses=True) as r:
        assert client.post("/events", json={"user_id": user_id, "items": ["i001"], "event_id": "e0"}).status_code == 200
        click = {"user_id": user_id, "items": ["i002"], "event_id": "e1"}
        blocker = _stall(debug_redis.url, 0.3)
        first = client.post("/events", json=click)
        blocker.join()
        assert first.status_code == 503, first.text
        assert "retrying with the same event_id is safe" in first.json()["detail"]
        retry = client.post("/events", json=click)
        assert retry.status_code == 200
        again = client.post("/events", json=click)  # a client that retries once too often
        assert again.status_code == 200 and again.json()["duplicate"] is True
        stored = r.lrange(hist_key(user_id), 0, -1)
        assert stored.count("i002") == 1 and stored.count("i001") == 1
        assert again.json()["history_length"] == len(stored)


def test_state_keys_expire_and_each_write_refreshes_them(serving_tree: Tree, bundle, redis_url: str) -> None:
    user_id = _user(bundle, 43)[0]
    with (
        running(settings(serving_tree, redis_url=redis_url, state_ttl_s=3600)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
        redis.Redis.from_url(redis_url, decode_responses=True) as r,
    ):
        r.hset(user_key(user_id), mapping={"region": "r1"})
        assert r.ttl(user_key(user_id)) == -1
        assert client.post("/events", json={"user_id": user_id, "items": ["i003"], "event_id": "x"}).status_code == 200
        keys = [hist_key(user_id), hist_time_key(user_id), seen_key(user_id), user_key(user_id)]
        ttls = [r.ttl(k) for k in keys]
        assert all(0 < t <= 3600 for t in ttls), ttls
        for k in keys:
            r.expire(k, 100)
        assert client.post("/events", json={"user_id": user_id, "items": ["i004"]}).status_code == 200
        assert all(r.ttl(k) > 100 for k in keys[:2] + keys[3:])  # refreshed on write


def test_one_slow_redis_call_degrades_only_its_own_request(
    tight: httpx.Client, bundle, debug_redis: RedisProcess
) -> None:
    user_id, client = _user(bundle, 44)[0], tight
    assert client.post("/events", json={"user_id": user_id, "items": ["i005"]}).status_code == 200
    blocker = _stall(debug_redis.url, 0.2)
    slow = client.post("/recall", json={"user_id": user_id, "k": 5}).json()
    blocker.join()
    after = client.post("/recall", json={"user_id": user_id, "k": 5}).json()  # well within a second
    assert slow["degraded"] == "redis_unavailable"
    assert after["degraded"] is None and after["user_state"] == "redis"
    assert client.get("/readyz").json()["redis_breaker"] == "closed"
