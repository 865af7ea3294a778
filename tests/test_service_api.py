"""The HTTP API through a real uvicorn server, user state from the bundle's own tables (no Redis configured)."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest

from index.bundle import load_index
from index.search import search
from models.bundle import load_bundle
from models.inputs import user_vectors
from models.rank import Ranker
from tests.serving import Tree, running, settings


@pytest.fixture(scope="module")
def api(serving_tree: Tree) -> Iterator[httpx.Client]:
    with running(settings(serving_tree)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def bundle(serving_tree: Tree):  # the retriever CURRENT pairs with
    return load_bundle(serving_tree.root / "models" / "tiny" / serving_tree.models[1])


def _user(bundle, row: int = 0) -> tuple[str, list[str]]:
    rec = bundle.users.slice(row, 1).to_pylist()[0]
    return str(rec["user_id"]), [str(x) for x in rec["history"]]


def test_health_ready_models(api: httpx.Client, serving_tree: Tree) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] is True and body["redis"] == "not_configured"
    assert (body["model_version"], body["index_version"]) == (serving_tree.models[1], serving_tree.indexes[1])
    models = api.get("/models").json()
    assert models["model"]["version"] == serving_tree.models[1]
    assert models["index"]["num_items"] == 1000 and models["index"]["metric"] == "inner_product"
    assert models["ranker"]["version"] == serving_tree.ranker
    assert "/recall" in api.get("/openapi.json").json()["paths"]


def test_recall_matches_offline_search(api: httpx.Client, serving_tree: Tree, bundle) -> None:
    """The served answer is the offline pipeline's: same user vector, same index, same exclusion."""
    user_id, history = _user(bundle, 3)
    r = api.post("/recall", json={"user_id": user_id, "k": 20})
    assert r.status_code == 200
    body = r.json()
    assert body["user_state"] == "bundle" and body["degraded"] is None
    assert (body["model_version"], body["index_version"]) == (serving_tree.models[1], serving_tree.indexes[1])
    index = load_index(serving_tree.root / "indexes" / "tiny", model_manifest=bundle.manifest)
    users = bundle.users.slice(3, 1)
    vectors, mask = user_vectors(bundle, users, [history])
    expected = search(index, vectors.numpy(), 20, mask.numpy(), exclude=[history])[0]
    got = [(i["item_id"], i["score"]) for i in body["items"]]
    assert [g[0] for g in got] == [h.item_id for h in expected]
    np.testing.assert_allclose([g[1] for g in got], [h.score for h in expected], rtol=1e-5, atol=1e-6)
    assert not set(history) & {g[0] for g in got}


def test_recall_exclusions_never_shorten_the_answer(api: httpx.Client, bundle) -> None:
    user_id, history = _user(bundle, 5)
    first = [i["item_id"] for i in api.post("/recall", json={"user_id": user_id, "k": 50}).json()["items"]]
    body = api.post("/recall", json={"user_id": user_id, "k": 50, "exclude": [*first[:30], "no-such-item"]}).json()
    items = [i["item_id"] for i in body["items"]]
    assert len(items) == 50 == len(set(items))
    assert not set(items) & set(first[:30])
    assert body["unknown_items"] == {"exclude": ["no-such-item"]}
    seen = api.post("/recall", json={"user_id": user_id, "k": 1000, "exclude_seen": False}).json()["items"]
    assert len(seen) == 1000 and set(history) <= {i["item_id"] for i in seen}
    everything = api.post("/recall", json={"user_id": user_id, "k": 1000}).json()["items"]
    assert len(everything) == 1000 - len(set(history))  # the catalog holds no more


def test_request_history_and_features_override_the_stored_state(api: httpx.Client, bundle) -> None:
    user_id = _user(bundle, 7)[0]
    other = _user(bundle, 8)[1]
    base = api.post("/recall", json={"user_id": user_id, "k": 10}).json()
    given = api.post("/recall", json={"user_id": user_id, "k": 10, "history": [*other, "ghost"]}).json()
    assert given["user_state"] == "request"
    assert given["unknown_items"] == {"history": ["ghost"]}
    assert [i["item_id"] for i in given["items"]] != [i["item_id"] for i in base["items"]]
    assert not set(other) & {i["item_id"] for i in given["items"]}
    region = bundle.users["region"][7].as_py()
    flipped = "r_other" if region != "r_other" else "r1"
    feat = api.post("/recall", json={"user_id": user_id, "k": 10, "features": {"region": flipped}}).json()
    assert [i["score"] for i in feat["items"]] != [i["score"] for i in base["items"]]


def test_unknown_user_gets_popularity_flagged(api: httpx.Client, bundle) -> None:
    body = api.post("/recall", json={"user_id": "never-seen", "k": 10, "exclude": ["i001"]}).json()
    assert body["degraded"] == "popularity_fallback" and body["user_state"] == "none"
    items = bundle.items
    order = np.argsort(-np.asarray(items["popularity"].to_pylist()), kind="stable")
    expected = [str(items["item_id"][int(i)]) for i in order if str(items["item_id"][int(i)]) != "i001"][:10]
    assert [i["item_id"] for i in body["items"]] == expected
    # the same unknown user with a history is personalised, not a fallback
    known = api.post("/recall", json={"user_id": "never-seen", "k": 10, "history": expected[:3]}).json()
    assert known["degraded"] is None and known["user_state"] == "request"


def test_rerank_orders_the_retrieved_candidates_by_tdm(api: httpx.Client, serving_tree: Tree, bundle) -> None:
    user_id, history = _user(bundle, 11)
    retrieved = api.post("/recall", json={"user_id": user_id, "k": 200}).json()["items"]
    body = api.post("/recall", json={"user_id": user_id, "k": 10, "rerank": True}).json()
    assert body["ranker_version"] == serving_tree.ranker
    items = body["items"]
    assert len(items) == 10
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    by_id = {i["item_id"]: i["score"] for i in retrieved}
    assert all(i["item_id"] in by_id and i["retrieval_score"] == pytest.approx(by_id[i["item_id"]]) for i in items)
    ranker = Ranker(load_bundle(serving_tree.root / "models" / "tiny_tdm"))
    ranked, _ = ranker.rank(user_id, history, list(by_id), 10)
    assert [i["item_id"] for i in items] == [r[0] for r in ranked]
    np.testing.assert_allclose(scores, [r[1] for r in ranked], rtol=1e-5, atol=1e-6)


def test_rank_scores_candidates_and_reports_unknown(api: httpx.Client, serving_tree: Tree, bundle) -> None:
    user_id, history = _user(bundle, 2)
    candidates = ["i010", "nope", "i020", "i030", "i040", "also-nope"]
    r = api.post("/rank", json={"user_id": user_id, "candidates": candidates, "k": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["unknown_items"] == {"candidates": ["nope", "also-nope"]}
    ranker = Ranker(load_bundle(serving_tree.root / "models" / "tiny_tdm"))
    ranked, unknown = ranker.rank(user_id, history, candidates, 3)
    assert [i["item_id"] for i in body["items"]] == [x[0] for x in ranked]
    assert unknown == ["nope", "also-nope"]


def test_model_name_must_be_the_loaded_one(api: httpx.Client, bundle) -> None:
    r = api.post("/recall", json={"user_id": _user(bundle)[0], "model": "other"})
    assert r.status_code == 404 and "model" in r.json()["message"]
    ok = api.post("/recall", json={"user_id": _user(bundle)[0], "model": "tiny", "k": 1})
    assert ok.status_code == 200


BAD = [
    ("/recall", {"k": 5}, "user_id"),
    ("/recall", {"user_id": ""}, "user_id"),
    ("/recall", {"user_id": "u", "k": 0}, "k"),
    ("/recall", {"user_id": "u", "k": 1001}, "k"),
    ("/recall", {"user_id": "u", "k": "many"}, "k"),
    ("/recall", {"user_id": "u", "history": "i001"}, "history"),
    ("/recall", {"user_id": "u", "history": [1, 2]}, "history"),
    ("/recall", {"user_id": "u", "exclude": [None]}, "exclude"),
    ("/recall", {"user_id": "u", "exclude_seen": "sometimes"}, "exclude_seen"),
    ("/recall", {"user_id": "u", "rerank": [True]}, "rerank"),
    ("/recall", {"user_id": "u", "features": ["region"]}, "features"),
    ("/recall", {"user_id": "u", "k": "10"}, "k"),  # integers only: no string or bool coercion
    ("/recall", {"user_id": "u", "k": True}, "k"),
    ("/recall", {"user_id": "u", "k": 10.5}, "k"),
    ("/recall", {"user_id": "u", "exclude_seen": "true"}, "exclude_seen"),
    ("/recall", {"user_id": "u", "exclude_sen": True}, "exclude_sen"),
    ("/rank", {"user_id": "u", "candidates": []}, "candidates"),
    ("/rank", {"user_id": "u", "candidates": ["i001"] * 1001}, "candidates"),
    ("/rank", {"user_id": "u"}, "candidates"),
    ("/rank", {"user_id": "u", "candidates": ["i001"], "k": 0}, "k"),
    ("/rank", {"user_id": "u", "candidates": ["i001", "i002", "i001"]}, "candidates"),
    ("/events", {"user_id": "u", "items": []}, "items"),
    ("/events", {"user_id": "u", "items": ["i001"], "event_id": ""}, "event_id"),
    ("/events", {"user_id": "u", "items": ["i001"], "timestamps": ["1700000000"]}, "timestamps"),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD)
def test_malformed_fields_are_422_naming_the_field(api: httpx.Client, path: str, body: dict, field: str) -> None:
    r = api.post(path, json=body)
    assert r.status_code == 422, r.text
    out = r.json()
    assert any(field in [str(p) for p in e["loc"]] for e in out["detail"]), out
    assert field in out["message"]


def test_non_json_and_oversized_bodies(api: httpx.Client) -> None:
    r = api.post("/recall", content=b"user_id=u&k=3", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "json" in r.json()["detail"][0]["type"]
    r = api.post("/recall", content=b"not json at all")
    assert r.status_code == 422
    big = b'{"user_id": "u", "exclude": [' + b",".join([b'"x"'] * 400_000) + b"]}"
    r = api.post("/recall", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"user_id": "u", "exclude": ['
        for _ in range(200):
            yield b",".join([b'"x"'] * 2000) + b","
        yield b'"x"]}'

    r = api.post("/recall", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert api.get("/healthz").status_code == 200


def test_admin_needs_the_token(api: httpx.Client) -> None:
    assert api.post("/admin/reload").status_code == 401
    assert api.post("/admin/reload", headers={"X-Quiver-Admin-Token": "guess"}).status_code == 403
    ok = api.post("/admin/reload", headers={"X-Quiver-Admin-Token": "s3cret"})
    assert ok.status_code == 200 and ok.json()["status"] == "unchanged"


def test_metrics_carry_the_design_series(api: httpx.Client, bundle, serving_tree: Tree) -> None:
    api.post("/recall", json={"user_id": _user(bundle)[0], "k": 5, "rerank": True})
    api.post("/recall", json={"user_id": "u", "k": 0})
    text = api.get("/metrics").text
    assert 'quiver_request_duration_seconds_count{endpoint="/recall",status="200"}' in text
    assert 'quiver_request_duration_seconds_count{endpoint="/recall",status="422"}' in text
    assert 'endpoint="/admin/reload",status="401"' in text
    for stage in ("feature_fetch", "user_tower", "search", "rerank"):
        prefix = f'quiver_stage_duration_seconds_count{{stage="{stage}"}}'
        line = next(x for x in text.splitlines() if x.startswith(prefix))
        assert float(line.split()[-1]) > 0, stage
    assert "quiver_index_items 1000.0" in text
    assert f'quiver_model_info{{name="tiny",role="retriever",version="{serving_tree.models[1]}"}} 1.0' in text
    assert "quiver_batch_size_count" in text


def test_events_without_redis_are_refused_not_lost(api: httpx.Client) -> None:
    r = api.post("/events", json={"user_id": "u", "items": ["i001"]})
    assert r.status_code == 503 and "QUIVER_REDIS_URL" in r.json()["detail"]


def test_without_a_ranker_rerank_and_rank_answer_503(serving_tree: Tree) -> None:
    with running(settings(serving_tree, ranker=None)) as url, httpx.Client(base_url=url) as client:
        assert client.post("/recall", json={"user_id": "u", "k": 3}).status_code == 200
        r = client.post("/recall", json={"user_id": "u", "k": 3, "rerank": True})
        assert r.status_code == 503 and "ranker" in r.json()["detail"]
        assert client.post("/rank", json={"user_id": "u", "candidates": ["i001"]}).status_code == 503


def test_not_ready_until_something_is_published(serving_tree: Tree, tmp_path: Path) -> None:
    empty = tmp_path / "artifacts"
    (empty / "models").mkdir(parents=True)
    with running(settings(empty)) as url, httpx.Client(base_url=url) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "tiny" in ready.json()["reason"]
        r = client.post("/recall", json={"user_id": "u"})
        assert r.status_code == 503 and "no model loaded" in r.json()["detail"]
        assert client.get("/healthz").status_code == 200
        (empty / "models").rmdir()
        published = serving_tree.copy(tmp_path / "published").root
        (published / "models").rename(empty / "models")
        (published / "indexes").rename(empty / "indexes")
        reload = client.post("/admin/reload", headers={"X-Quiver-Admin-Token": "s3cret"})
        assert reload.status_code == 200 and reload.json()["status"] == "reloaded"
        assert client.get("/readyz").status_code == 200
        assert len(client.post("/recall", json={"user_id": "u", "k": 4}).json()["items"]) == 4


def test_pyarrow_profile_values_of_the_wrong_type_become_null() -> None:
    from service.userstate import BundleUsers

    users = pa.table({"user_id": ["a"], "age": pa.array([30], pa.int64()), "history": [["i1"]]})
    table = BundleUsers(users, ["age"]).profile_table([{"user_id": "b", "age": "41"}, {"user_id": "c", "age": "x"}])
    assert table["age"].to_pylist() == [41, None]
    assert table.schema.field("age").type == pa.int64()


def test_an_internal_fault_is_a_counted_json_500(api: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected fault (a bug cannot be made on demand): the batch fails its request, the service goes on."""
    from service.runtime import Runtime

    def broken(self: Runtime, jobs: list) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(Runtime, "recall", broken)
    r = api.post("/recall", json={"user_id": "u", "k": 3})
    assert r.status_code == 500 and r.json() == {"detail": "internal error (logged)"}
    monkeypatch.undo()
    assert api.post("/recall", json={"user_id": "u", "k": 3}).status_code == 200
    assert 'quiver_errors_total{kind="unhandled"} 1.0' in api.get("/metrics").text


def test_unknown_paths_and_methods_are_json(api: httpx.Client) -> None:
    r = api.get("/nope")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    assert api.get("/recall").status_code == 405
    assert 'endpoint="other",status="404"' in api.get("/metrics").text
