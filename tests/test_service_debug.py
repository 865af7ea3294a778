"""The debug views (issue 17, item 5): GET /items/{id} and GET /users/{id} through a real server and a real
redis-server, including their 404s, an item upserted after training, a click seen through the user view, Redis
state left untouched by a look, and a Redis outage answered from the bundle."""

import re
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from index.options import PublishOptions, RunOptions
from index.upsert import add_items
from models.bundle import ModelBundle, load_bundle
from tests.conftest import RedisProcess
from tests.serving import Tree, running, settings

NEW_ITEM = "i-added/after-training"  # upserted into the index only; a '/' in it too


@pytest.fixture(scope="module")
def tree(serving_tree: Tree, tmp_path_factory: pytest.TempPathFactory) -> Tree:
    """The serving tree with one item upserted into the CURRENT index (`quiver-index add`): served, not in the
    model's catalog."""
    tree = serving_tree.copy(tmp_path_factory.mktemp("debug") / "artifacts")
    catalog = load_bundle(tree.root / "models" / "tiny" / tree.models[1]).items
    first = catalog.drop_columns(["popularity"]).slice(0, 1).to_pylist()[0]
    delta = tree.root.parent / "delta.parquet"
    pq.write_table(pa.Table.from_pylist([{**first, "item_id": NEW_ITEM}]), delta)
    add_items(
        tree.root / "indexes" / "tiny",
        delta,
        RunOptions(allow_low_recall=True, threads=1),
        PublishOptions(),
        models_root=tree.root / "models",
    )
    return tree


@pytest.fixture(scope="module")
def bundle(tree: Tree) -> ModelBundle:
    return load_bundle(tree.root / "models" / "tiny" / tree.models[1])


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A redis-server of this module's own: one test stops it."""
    server = RedisProcess(tmp_path_factory.mktemp("redis-debug")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api(tree: Tree, redis_server: RedisProcess) -> Iterator[httpx.Client]:
    with running(settings(tree, redis_url=redis_server.url)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture
def raw(redis_server: RedisProcess) -> Iterator[redis.Redis]:
    """Bytes in, bytes out: DUMP answers binary."""
    with redis.Redis.from_url(redis_server.url) as client:
        yield client


def _user(bundle: ModelBundle, row: int) -> tuple[str, list[str]]:
    rec = bundle.users.slice(row, 1).to_pylist()[0]
    return str(rec["user_id"]), [str(x) for x in rec["history"]]


def _snapshot(raw: redis.Redis) -> dict[bytes, tuple[bytes | None, int]]:
    """Every key's serialised value and its TTL (ms)."""
    return {key: (raw.dump(key), int(raw.pttl(key))) for key in raw.keys("*")}


def _metric(api: httpx.Client, name: str, **labels: str) -> float:
    """One sample of the Prometheus text (0 when the series does not exist yet)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in api.get("/metrics").text.splitlines():
        m = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if m and ",".join(sorted((m.group(1) or "").split(","))) == want:
            total += float(m.group(2))
    return total


def test_a_catalog_item(api: httpx.Client, tree: Tree, bundle: ModelBundle) -> None:
    row = bundle.items.slice(7, 1).to_pylist()[0]
    body = api.get(f"/items/{row['item_id']}").json()
    assert body == {
        "model_version": tree.models[1],
        "index_version": body["index_version"],
        "ranker_version": tree.ranker,
        "item_id": row["item_id"],
        "in_catalog": True,
        "attributes": {k: v for k, v in row.items() if k not in {"item_id", "popularity"}},
        "popularity": float(row["popularity"]),
        "in_index": True,
        "index_label": body["index_label"],
        "filter_attributes": {k: row[k] for k in ("category", "brand", "price")},
        "in_ranker": True,
    }
    assert (
        isinstance(body["index_label"], int) and body["index_version"] == api.get("/models").json()["index"]["version"]
    )
    assert body["index_version"] not in tree.indexes  # the upserted version is the one served


def test_an_item_added_after_training_is_found_without_attributes(api: httpx.Client, bundle: ModelBundle) -> None:
    r = api.get(f"/items/{NEW_ITEM}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["in_index"] is True and body["index_label"] == bundle.items.num_rows  # appended after the catalog
    assert body["in_catalog"] is False and body["attributes"] is None and body["popularity"] is None
    assert body["in_ranker"] is False
    first = bundle.items.slice(0, 1).to_pylist()[0]  # the upsert copied the first item's attributes
    assert body["filter_attributes"] == {k: first[k] for k in ("category", "brand", "price")}
    # and a filter on them finds it (every passing item, by popularity, for a user nobody knows)
    flt = {"category": [first["category"]]}
    found = api.post("/recall", json={"user_id": "nobody", "k": 1000, "filter": flt}).json()["items"]
    assert NEW_ITEM in [i["item_id"] for i in found]
    assert api.get(f"/items/{quote(NEW_ITEM, safe='')}").json() == body  # a percent-encoded '/' is the same id


def test_an_unknown_item_is_a_404_naming_it(api: httpx.Client) -> None:
    r = api.get("/items/no-such-item")
    assert r.status_code == 404 and "'no-such-item'" in r.json()["detail"]
    # the views are counted under their route templates, not one series per id nor as "other"
    assert _metric(api, "quiver_request_duration_seconds_count", endpoint="/items/{item_id:path}", status="404") >= 1
    assert api.get(f"/items/{'x' * 257}").status_code == 422  # ids are at most 256 characters, as in the bodies


def test_a_user_from_the_bundle(api: httpx.Client, tree: Tree, bundle: ModelBundle) -> None:
    user_id, history = _user(bundle, 11)
    body = api.get(f"/users/{user_id}").json()
    assert body["source"] == "bundle" and body["redis"] == "ok" and body["degraded"] is None
    assert body["history"] == history[-20:]  # oldest first, the latest max(tower, ranker) = 20 items
    assert body["tower_history_length"] == 20
    assert set(body["profile"]) == {"region"}  # the fields the user tower reads (tiny: user_id and region)
    assert body["profile"]["region"] == bundle.users["region"][11].as_py()
    assert (body["model_version"], body["ranker_version"]) == (tree.models[1], tree.ranker)
    recall = api.post("/recall", json={"user_id": user_id, "k": 5}).json()
    assert recall["user_state"] == body["source"] and recall["degraded"] == body["degraded"]


def test_a_click_shows_in_the_user_view(api: httpx.Client, bundle: ModelBundle) -> None:
    user_id, history = _user(bundle, 12)
    ev = api.post("/events", json={"user_id": user_id, "items": ["i005"], "timestamps": [1_700_000_000]})
    assert ev.status_code == 200, ev.text
    body = api.get(f"/users/{user_id}").json()
    assert body["source"] == "redis" and body["redis"] == "ok"
    assert body["history"] == [*history, "i005"][-20:]  # the bundle history seeded Redis, the click on top
    assert body["history_timestamps"] is not None and body["history_timestamps"][-1] == 1_700_000_000
    # a user only Redis knows, with an item the index does not hold
    assert api.post("/events", json={"user_id": "newcomer", "items": ["i010", "gone-item"]}).status_code == 200
    newcomer = api.get("/users/newcomer").json()
    assert newcomer["source"] == "redis" and newcomer["history"] == ["i010", "gone-item"]
    assert newcomer["unknown_items"] == ["gone-item"] and newcomer["profile"] == {}


def test_an_unknown_user_is_a_404_naming_it(api: httpx.Client) -> None:
    r = api.get("/users/nobody-knows-me")
    assert r.status_code == 404 and "'nobody-knows-me'" in r.json()["detail"]


def test_looking_changes_no_redis_state_and_counts_no_recall(
    api: httpx.Client, raw: redis.Redis, bundle: ModelBundle
) -> None:
    user_id = _user(bundle, 13)[0]
    assert api.post("/events", json={"user_id": user_id, "items": ["i001"], "event_id": "e1"}).status_code == 200
    before = _snapshot(raw)
    assert before  # the history, times, seen ids and profile keys of the users above
    fetches = _metric(api, "quiver_stage_duration_seconds_count", stage="feature_fetch")
    for uid in (user_id, _user(bundle, 14)[0], "nobody-knows-me", "newcomer"):
        api.get(f"/users/{uid}")
    after = _snapshot(raw)
    assert set(after) == set(before)
    for key, (value, ttl) in after.items():
        assert value == before[key][0], key
        assert ttl <= before[key][1], key  # no TTL refreshed
    assert _metric(api, "quiver_stage_duration_seconds_count", stage="feature_fetch") == fetches


def test_redis_down_answers_from_the_bundle(api: httpx.Client, redis_server: RedisProcess, bundle: ModelBundle) -> None:
    user_id, history = _user(bundle, 15)
    degraded = _metric(api, "quiver_degraded_total", reason="redis_unavailable")
    redis_server.stop()
    try:
        r = api.get(f"/users/{user_id}")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["redis"] == "unavailable" and body["degraded"] == "redis_unavailable"
        assert body["source"] == "bundle" and body["history"] == history[-20:]
        # not in the bundle: Redis might know them, so not a 404 but what /recall serves them now
        stranger = api.get("/users/nobody-knows-me").json()
        assert stranger["source"] == "none" and stranger["history"] == []
        assert stranger["degraded"] == "redis_unavailable,popularity_fallback"
        assert _metric(api, "quiver_degraded_total", reason="redis_unavailable") == degraded
    finally:
        redis_server.start()
