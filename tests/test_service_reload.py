"""Hot swap: reloads under load, refusal of damaged bundles, and reloads triggered by the Redis publish channel."""

import asyncio
import gc
import json
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from index.build import build
from index.bundle import INDEX_FILE
from index.options import BuildOptions, PublishOptions
from index.publish import channel, notify
from models.bundle import sha256_file
from service.metrics import Metrics
from service.reload import RuntimeHolder
from service.runtime import Runtime
from tests.serving import Tree, running, settings

TOKEN = {"X-Quiver-Admin-Token": "s3cret"}
USER = {"user_id": "u012", "k": 15}


def _reload(client: httpx.Client, force: bool = False) -> httpx.Response:
    return client.post("/admin/reload", params={"force": force}, headers=TOKEN)


def _pair(body: dict) -> tuple[str, str]:
    return body["model_version"], body["index_version"]


def test_fifty_reloads_under_load_fail_nothing_and_mix_nothing(serving_tree: Tree, tmp_path: Path) -> None:
    tree = serving_tree.copy(tmp_path / "artifacts")
    pairs = [(tree.models[i], tree.indexes[i]) for i in (0, 1)]
    with running(settings(tree)) as url, httpx.Client(base_url=url, timeout=30) as client:
        expected: dict[tuple[str, str], list[tuple[str, float]]] = {}
        for which in (0, 1):
            tree.point(which)
            assert _reload(client).json()["status"] == "reloaded"
            body = client.post("/recall", json=USER).json()
            assert _pair(body) == pairs[which]
            assert body["user_state"] == "bundle"
            expected[pairs[which]] = [(i["item_id"], i["score"]) for i in body["items"]]
        assert expected[pairs[0]] != expected[pairs[1]]  # two models, two answers: a mix would show

        stop = threading.Event()
        seen: list[tuple[int, tuple[str, str] | None, list[tuple[str, float]]]] = []
        lock = threading.Lock()

        def hammer(rerank: bool) -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                while not stop.is_set():
                    r = c.post("/recall", json={**USER, "rerank": rerank})
                    body = r.json() if r.status_code == 200 else {}
                    items = [(i["item_id"], i["score"]) for i in body.get("items", [])]
                    with lock:
                        seen.append((r.status_code, _pair(body) if body else None, items if not rerank else []))

        threads = [threading.Thread(target=hammer, args=(n == 0,)) for n in range(3)]
        for t in threads:
            t.start()
        outcomes = []
        for n in range(50):
            tree.point(n % 2)
            outcomes.append(_reload(client).json()["status"])
        stop.set()
        for t in threads:
            t.join()
    assert outcomes == ["reloaded"] * 50
    assert len(seen) > 50
    assert [s for s in seen if s[0] != 200] == []
    assert {s[1] for s in seen} <= set(pairs)
    for _, pair, items in seen:
        assert pair is not None
        if items:  # batched and single tower passes differ in the last float bits, models differ far more
            assert [i for i, _ in items] == [i for i, _ in expected[pair]]
            assert [s for _, s in items] == pytest.approx([s for _, s in expected[pair]], abs=1e-5)


def test_a_corrupted_bundle_is_refused_and_the_old_one_stays(serving_tree: Tree, tmp_path: Path) -> None:
    tree = serving_tree.copy(tmp_path / "artifacts")
    tree.point(0)
    with running(settings(tree)) as url, httpx.Client(base_url=url, timeout=30) as client:
        before = client.post("/recall", json=USER).json()
        assert _pair(before) == (tree.models[0], tree.indexes[0])
        damaged = tree.root / "indexes" / "tiny" / tree.indexes[1] / INDEX_FILE
        good_index = damaged.read_bytes()
        damaged.write_bytes(good_index[:-64])
        tree.point(1)
        r = _reload(client)
        assert r.status_code == 409
        body = r.json()
        assert body["status"] == "refused" and INDEX_FILE in body["reason"]
        assert (body["model_version"], body["index_version"]) == (tree.models[0], tree.indexes[0])
        after = client.post("/recall", json=USER).json()
        assert _pair(after) == _pair(before) and after["items"] == before["items"]
        assert client.get("/readyz").status_code == 200
        # the index repaired but the model it pairs with damaged: refused the same way
        damaged.write_bytes(good_index)
        weights = tree.root / "models" / "tiny" / tree.models[1] / "weights.safetensors"
        good_weights = weights.read_bytes()
        weights.write_bytes(b"\0" * len(good_weights))
        refused = _reload(client, force=True)
        assert refused.status_code == 409 and "weights.safetensors" in refused.json()["reason"]
        assert _pair(client.post("/recall", json=USER).json()) == _pair(before)
        weights.write_bytes(good_weights)  # repaired: the same versions now load
        assert _reload(client, force=True).json()["status"] == "reloaded"
        assert _pair(client.post("/recall", json=USER).json()) == (tree.models[1], tree.indexes[1])
        assert 'quiver_reloads_total{outcome="refused"}' in client.get("/metrics").text


def test_a_publish_on_the_redis_channel_swaps_the_pair(serving_tree: Tree, tmp_path: Path, redis_url: str) -> None:
    tree = serving_tree.copy(tmp_path / "artifacts")
    tree.point(0)
    with running(settings(tree, redis_url=redis_url)) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert _pair(client.post("/recall", json=USER).json()) == (tree.models[0], tree.indexes[0])
        tree.point(1)  # a pointer move alone does not reload (polling is off in these settings) ...
        time.sleep(0.3)
        assert _pair(client.post("/recall", json=USER).json()) == (tree.models[0], tree.indexes[0])
        deadline = time.monotonic() + 15
        while True:  # ... the announcement does; the listener may still be subscribing, so announce until seen
            assert notify(redis_url, "tiny", tree.indexes[1], tree.root / "indexes" / "tiny" / tree.indexes[1])
            time.sleep(0.2)
            pair = _pair(client.post("/recall", json=USER).json())
            if pair == (tree.models[1], tree.indexes[1]) or time.monotonic() > deadline:
                break
        assert pair == (tree.models[1], tree.indexes[1])


def test_polling_picks_up_a_new_current(serving_tree: Tree, tmp_path: Path) -> None:
    tree = serving_tree.copy(tmp_path / "artifacts")
    tree.point(0)
    with running(settings(tree, reload_poll_s=0.2)) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert _pair(client.post("/recall", json=USER).json()) == (tree.models[0], tree.indexes[0])
        tree.point(1)
        deadline = time.monotonic() + 15
        while _pair(client.get("/readyz").json()) != (tree.models[1], tree.indexes[1]):
            assert time.monotonic() < deadline, "the poll never swapped"
            time.sleep(0.1)


def test_an_index_for_another_model_name_is_refused(serving_tree: Tree, tmp_path: Path) -> None:
    tree = serving_tree.copy(tmp_path / "artifacts")
    with running(settings(tree, model="other", index="tiny")) as url, httpx.Client(base_url=url) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "built from model 'tiny'" in ready.json()["reason"]


@pytest.mark.parametrize("flag", ["0", "false"])
def test_microbatching_can_be_turned_off(serving_tree: Tree, flag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUIVER_MICROBATCH", flag)
    cfg = settings(serving_tree)  # the environment fills what the overrides leave out
    assert cfg.microbatch is False
    with running(cfg) as url, httpx.Client(base_url=url) as client:
        body = client.post("/recall", json=USER).json()
        assert len(body["items"]) == 15
        assert "quiver_batch_size_count 0.0" in client.get("/metrics").text


def _truncate_weights(tree: Tree, model_version: str) -> None:
    """The probe's bundle: weights cut to 1,000 bytes with the manifest's checksum updated, so only loading the
    file (safetensors' own header check) can tell."""
    folder = tree.root / "models" / "tiny" / model_version
    weights = folder / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["weights.safetensors"] = sha256_file(weights)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _publish_valid(tree: Tree, redis_url: str | None = None) -> str:
    """A new index version over the served model (another recall sample seed: another version), published the
    way a rebuild job does; returns its version."""
    model = tree.root / "models" / "tiny" / tree.models[0]
    opts = BuildOptions(factory="Flat", seed=int(time.time_ns() % 1_000_000) + 1)
    return build(model, tree.root / "indexes", opts, PublishOptions(keep=10, redis_url=redis_url)).version


def _wait(check: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _refused_count(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('quiver_reloads_total{outcome="refused"}'):
            return float(line.split()[-1])
    return 0.0


def test_truncated_weights_through_admin_reload_are_a_409_and_nothing_changes(
    serving_tree: Tree, tmp_path: Path
) -> None:
    tree = serving_tree.copy(tmp_path / "artifacts")
    tree.point(0)
    with running(settings(tree)) as url, httpx.Client(base_url=url, timeout=30) as client:
        before = client.post("/recall", json=USER).json()
        _truncate_weights(tree, tree.models[1])
        tree.point(1)
        for attempt in range(2):  # asked twice: refused twice (never "unchanged"), loaded once
            r = _reload(client)
            assert r.status_code == 409, r.text
            assert r.json()["status"] == "refused" and "Safetensor" in r.json()["reason"]
            assert (r.json()["model_version"], r.json()["index_version"]) == (tree.models[0], tree.indexes[0])
            assert _refused_count(client) == 1, attempt
        after = client.post("/recall", json=USER).json()
        assert _pair(after) == _pair(before) and after["items"] == before["items"]
        ready = client.get("/readyz")
        assert ready.status_code == 200
        refusal = ready.json()["last_refusal"]
        assert refusal["versions"][:2] == [tree.models[1], tree.indexes[1]] and time.time() - refusal["at"] < 60
        assert client.get("/models").json()["last_refusal"] == refusal
        version = _publish_valid(tree)  # a valid publish afterwards is served
        r = _reload(client)
        assert r.status_code == 200 and r.json()["index_version"] == version
        assert client.get("/readyz").json()["last_refusal"] is None


def test_the_poll_survives_a_broken_bundle_and_serves_the_next_valid_one(serving_tree: Tree, tmp_path: Path) -> None:
    tree = serving_tree.copy(tmp_path / "artifacts")
    tree.point(0)
    with running(settings(tree, reload_poll_s=0.1)) as url, httpx.Client(base_url=url, timeout=30) as client:
        _truncate_weights(tree, tree.models[1])
        tree.point(1)
        _wait(lambda: client.get("/readyz").json()["last_refusal"] is not None, "the poll never tried the bundle")
        assert _pair(client.get("/readyz").json()) == (tree.models[0], tree.indexes[0])
        # the poll saw it first; /admin/reload still says it is refused (a deploy script must not read success)
        r = _reload(client)
        assert r.status_code == 409 and r.json()["status"] == "refused"
        assert _refused_count(client) == 1  # polled many times, refused (and loaded) once
        version = _publish_valid(tree)
        _wait(lambda: client.get("/readyz").json()["index_version"] == version, "the poll died: valid publish unseen")


def test_the_listener_survives_a_broken_bundle_and_serves_the_next_valid_one(
    serving_tree: Tree, tmp_path: Path, redis_url: str
) -> None:
    tree = serving_tree.copy(tmp_path / "artifacts")
    tree.point(0)
    channel_name = channel("tiny")
    with running(settings(tree, redis_url=redis_url)) as url, httpx.Client(base_url=url, timeout=30) as client:
        probe = redis.Redis.from_url(redis_url)
        _wait(lambda: dict(probe.pubsub_numsub(channel_name)).get(channel_name.encode(), 0) >= 1, "no subscriber")
        _truncate_weights(tree, tree.models[1])
        tree.point(1)
        folder = tree.root / "indexes" / "tiny" / tree.indexes[1]
        _wait(
            lambda: (
                notify(redis_url, "tiny", tree.indexes[1], folder)
                and client.get("/readyz").json()["last_refusal"] is not None
            ),
            "the listener never tried the bundle",
        )
        assert _pair(client.get("/readyz").json()) == (tree.models[0], tree.indexes[0])
        assert dict(probe.pubsub_numsub(channel_name))[channel_name.encode()] >= 1  # still subscribed
        version = _publish_valid(tree, redis_url)  # announced on the channel; polling is off in these settings
        _wait(lambda: client.get("/readyz").json()["index_version"] == version, "the listener died: publish unheard")
        probe.close()


def test_a_swap_keeps_the_served_runtime_out_of_the_collector_and_frees_the_old_one(
    serving_tree: Tree, tmp_path: Path
) -> None:
    """A full collection walks every tracked object; the loaded triple's are frozen at each swap (service/reload.py
    settle_heap), and the runtime swapped out goes when its last user does, cycles or not."""
    tree = serving_tree.copy(tmp_path / "artifacts")
    tree.point(0)
    holder = RuntimeHolder(settings(tree), Metrics())

    async def swaps() -> weakref.ref[Runtime]:
        assert (await holder.reload()).status == "reloaded"
        first = holder.current
        assert first is not None
        tracked = {id(o) for o in gc.get_objects()}  # the generations a collection walks, not the frozen one
        assert id(first) not in tracked and id(first.retriever) not in tracked
        old = weakref.ref(first)
        del first
        tree.point(1)
        assert (await holder.reload()).status == "reloaded"
        return old

    try:
        old = asyncio.run(swaps())
        assert holder.current is not None and id(holder.current) not in {id(o) for o in gc.get_objects()}
        assert old() is None
    finally:
        gc.unfreeze()  # as the app's shutdown does: the interpreter's exit collects what was frozen
