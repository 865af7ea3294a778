"""A sequence model served (DESIGN §4, §7): the user tower reads the history the service resolves, right-aligned,
and a click POSTed to /events changes the very next /recall, through real uvicorn and a real redis-server."""

import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import redis

from index.build import build
from index.options import BuildOptions, PublishOptions
from models.bundle import ModelBundle, load_bundle
from models.sequence import HIST_TIME
from service.model_process import _answer_run, decode_answer, decode_batch, encode_batch
from service.runtime import RecallJob, Runtime, find_target, load_runtime
from service.userstate import UserState, hist_key, hist_time_key, user_key
from tests.conftest import sequence_config
from tests.serving import running, settings
from training.config import parse_config
from training.trainer import fit


@pytest.fixture(scope="module")
def sasrec_tree(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelBundle]:
    root = tmp_path_factory.mktemp("sasrec_serving") / "artifacts"
    cfg = sequence_config(demo_dir, root / "models", num_threads=1, epochs=10)
    path = fit(parse_config(cfg, "test")).bundle
    assert path is not None
    build(path, root / "indexes", BuildOptions(factory="Flat"), PublishOptions())
    return root, load_bundle(path)


def test_a_click_changes_the_next_recall_towards_the_items_that_follow_it(
    sasrec_tree: tuple[Path, ModelBundle], redis_url: str, demo_dir: Path
) -> None:
    """In the demo data a session stays inside one category, so what follows a click is mostly items of its category.
    Control: the same user with a click on another category instead (sent as request history)."""
    root, bundle = sasrec_tree
    items = pq.read_table(demo_dir / "items.parquet", columns=["item_id", "category"]).to_pylist()
    category = {str(r["item_id"]): r["category"] for r in items}
    users = bundle.users.to_pylist()[:40]
    keys = [key(str(u["user_id"])) for u in users for key in (hist_key, user_key)]
    with redis.Redis.from_url(redis_url) as r:  # the demo users are the other service tests' users too: start and
        r.delete(*keys)  # leave them unknown to Redis
        try:
            more = _click_then_recall(root, redis_url, users, category)
        finally:
            r.delete(*keys)
    assert more >= 0.65 * len(users), f"the click's category rose for {more} of {len(users)} users"


def _click_then_recall(root: Path, redis_url: str, users: list[dict], category: dict[str, object]) -> int:
    """For how many users the click's category rose more than after the control click."""
    more = 0
    with (
        running(settings(root, model="tiny_sasrec", ranker=None, redis_url=redis_url)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        for rec in users:
            user_id, history = str(rec["user_id"]), [str(x) for x in rec["history"]]
            before = client.post("/recall", json={"user_id": user_id, "k": 50}).json()
            assert before["user_state"] == "bundle"
            ranked = [i["item_id"] for i in before["items"]]
            click = ranked[-1]  # the item this user was least likely to be shown next
            other = next(i for i in [*ranked, *category] if category[i] != category[click])
            assert client.post("/events", json={"user_id": user_id, "items": [click]}).status_code == 200
            after = client.post("/recall", json={"user_id": user_id, "k": 50}).json()
            assert after["user_state"] == "redis"
            new = [i["item_id"] for i in after["items"]]
            assert new != ranked and click not in new  # the very next answer moved; the click is now seen
            # The same history sent in the request gives the same answer: request and Redis are read alike (Redis
            # keeps the latest max_seq_len items, which is also what the tower and the seen-item exclusion read).
            replay = client.post("/recall", json={"user_id": user_id, "k": 50, "history": [*history, click][-20:]})
            assert [i["item_id"] for i in replay.json()["items"]] == new
            control = client.post("/recall", json={"user_id": user_id, "k": 50, "history": [*history, other][-20:]})
            theirs = [i["item_id"] for i in control.json()["items"]]
            in_click_category = [sum(category[i] == category[click] for i in answer) for answer in (new, theirs)]
            more += in_click_category[0] > in_click_category[1]
    return more


def test_a_micro_batch_of_different_lengths_is_one_padded_forward(sasrec_tree: tuple[Path, ModelBundle]) -> None:
    root, bundle = sasrec_tree
    from index.bundle import load_index

    rt = Runtime(bundle, load_index(root / "indexes" / "tiny_sasrec", model_manifest=bundle.manifest), None)
    histories = [h for h in bundle.users["history"].to_pylist()[:6]]
    histories[2] = histories[2][:1]
    histories[4] = [*histories[0], *histories[1], *histories[3]]  # longer than max_seq_len: the latest are kept
    states = [
        UserState(f"u{i}", {"user_id": f"u{i}"}, [str(x) for x in h], "request", True) for i, h in enumerate(histories)
    ]
    batched, mask = rt.user_vectors(states)
    assert mask.all() and batched.shape[:2] == (6, 1)
    for i, state in enumerate(states):
        alone, _ = rt.user_vectors([state])
        assert np.allclose(alone, batched[i : i + 1], atol=1e-5)
    latest = UserState("u", {"user_id": "u"}, states[4].history[-rt.history_len :], "request", True)
    assert np.allclose(rt.user_vectors([latest])[0], batched[4:5], atol=1e-5)


@pytest.fixture(scope="module")
def hstu_time_tree(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelBundle]:
    root = tmp_path_factory.mktemp("hstu_time_serving") / "artifacts"
    cfg = sequence_config(demo_dir, root / "models", "hstu", num_threads=1, epochs=3)
    cfg["model"]["time_buckets"] = 24
    path = fit(parse_config(cfg, "test")).bundle
    assert path is not None
    build(path, root / "indexes", BuildOptions(factory="Flat"), PublishOptions())
    return root, load_bundle(path)


def test_a_time_reading_model_is_served_with_the_click_times(
    hstu_time_tree: tuple[Path, ModelBundle], redis_url: str
) -> None:
    root, bundle = hstu_time_tree
    rec = bundle.users.slice(3, 1).to_pylist()[0]
    user_id, history, times = str(rec["user_id"]), [str(x) for x in rec["history"]], rec["history_time"]
    cfg = settings(root, model="tiny_hstu", ranker=None, redis_url=redis_url)
    with (
        redis.Redis.from_url(redis_url, decode_responses=True) as r,
        running(cfg) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        r.delete(hist_key(user_id), hist_time_key(user_id), user_key(user_id))
        try:
            stored = client.post("/recall", json={"user_id": user_id, "k": 20}).json()
            assert stored["user_state"] == "bundle" and stored["degraded"] is None
            same = {"user_id": user_id, "k": 20, "history": history, "history_timestamps": times}
            sent = client.post("/recall", json=same).json()
            assert [i["item_id"] for i in sent["items"]] == [i["item_id"] for i in stored["items"]]
            later = [t + 86_400 * 30 * i for i, t in enumerate(times)]  # the same clicks a month apart each
            moved = client.post("/recall", json=same | {"history_timestamps": later}).json()
            assert [i["score"] for i in moved["items"]] != [i["score"] for i in sent["items"]]
            missing = client.post("/recall", json={"user_id": user_id, "history": history})
            assert missing.status_code == 422 and "body.history_timestamps" in missing.json()["message"]
            short = client.post("/recall", json=same | {"history_timestamps": times[:-1]})
            assert short.status_code == 422 and "history_timestamps" in short.json()["message"]
            # Clicks with their times reach Redis beside the bundle history (seeded with the bundle's times).
            click = str(bundle.items["item_id"][0])
            ev = client.post("/events", json={"user_id": user_id, "items": [click], "timestamps": [times[-1] + 60]})
            assert ev.status_code == 200
            assert r.lrange(hist_key(user_id), 0, 1) == [click, history[-1]]
            assert [int(t) for t in r.lrange(hist_time_key(user_id), 0, 1)] == [times[-1] + 60, times[-1]]
            assert r.llen(hist_time_key(user_id)) == r.llen(hist_key(user_id))
            live = client.post("/recall", json={"user_id": user_id, "k": 20}).json()
            replay = same | {"history": [*history, click][-20:], "history_timestamps": [*times, times[-1] + 60][-20:]}
            assert live["user_state"] == "redis" and live["degraded"] is None
            assert [i["item_id"] for i in live["items"]] == [
                i["item_id"] for i in client.post("/recall", json=replay).json()["items"]
            ]
            before = int(time.time())
            assert client.post("/events", json={"user_id": user_id, "items": [click]}).status_code == 200
            assert int(r.lindex(hist_time_key(user_id), 0)) >= before  # no times sent: when the click arrived
            # A history Redis kept without times (written before times were stored) is served, flagged.
            r.delete(hist_time_key(user_id))
            flagged = client.post("/recall", json={"user_id": user_id, "k": 20}).json()
            assert flagged["user_state"] == "redis" and flagged["degraded"] == "history_time_missing"
            # The next click realigns the two lists: the untimed items get time 0, the click its own.
            assert client.post("/events", json={"user_id": user_id, "items": [click]}).status_code == 200
            clock = [int(t) for t in r.lrange(hist_time_key(user_id), 0, -1)]
            assert len(clock) == r.llen(hist_key(user_id)) and clock[0] >= before and set(clock[1:]) == {0}
            bad = client.post("/events", json={"user_id": user_id, "items": [click], "timestamps": [1, 2]})
            assert bad.status_code == 422 and "timestamps" in bad.json()["message"]
        finally:
            r.delete(hist_key(user_id), hist_time_key(user_id), user_key(user_id))


def test_the_model_process_gets_a_time_reading_models_click_times(hstu_time_tree: tuple[Path, ModelBundle]) -> None:
    """QUIVER_MODEL_PROCESS: the click times travel to the child with the history, which encodes both; the child's
    answer is the in-process one, and moving the clicks in time moves it."""
    root, bundle = hstu_time_tree
    rt = load_runtime(find_target(settings(root, model="tiny_hstu", ranker=None)))
    rec = bundle.users.slice(3, 1).to_pylist()[0]
    history, times = [str(x) for x in rec["history"]], rec["history_time"]
    later = [t + 86_400 * 30 * i for i, t in enumerate(times)]
    jobs = [
        RecallJob(UserState(str(rec["user_id"]), {"user_id": rec["user_id"]}, history, "request", True, [], t), 20, [])
        for t in (times, later)
    ]
    head, inputs = decode_batch(encode_batch(1, rt, jobs, rt.profile_inputs(jobs)))
    assert [j[-1] for j in head["jobs"]] == [times, later]  # the clicks' times travel with the history's ids
    assert HIST_TIME not in (inputs or {})  # encoded by the child, with the history
    (answer,) = _answer_run(rt, [(head, inputs)])
    found = decode_answer(answer)["found"]
    alone, _ = rt.recall(jobs)
    for got, want in zip(found, alone, strict=True):
        assert got.item_ids == want.item_ids and got.scores == pytest.approx(want.scores, abs=1e-5)
    assert found[0].scores != pytest.approx(found[1].scores, abs=1e-6)
