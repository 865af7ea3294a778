"""The service over a ScaNN index bundle (issue 16): a real uvicorn server serves it, hot-swaps to a FAISS bundle and
back under load, and every answer holds exactly k items with the exclusions honoured."""

import threading
from pathlib import Path

import httpx
import pytest

from index.build import build
from index.options import BuildOptions, PublishOptions, RunOptions
from index.publish import point_current
from tests.serving import Tree, running, settings

pytest.importorskip("scann")

TOKEN = {"X-Quiver-Admin-Token": "s3cret"}


def _answer(client: httpx.Client, body: dict) -> tuple[str, list[str]]:
    r = client.post("/recall", json=body)
    assert r.status_code == 200, r.text
    return r.json()["index_version"], [i["item_id"] for i in r.json()["items"]]


def test_a_scann_bundle_is_served_and_hot_swapped_with_faiss(serving_tree: Tree, tmp_path: Path) -> None:
    tree = serving_tree.copy(tmp_path / "artifacts")
    model = tree.root / "models" / "tiny" / tree.models[1]
    opts = BuildOptions(factory="scann", run=RunOptions(threads=1))
    scann = build(model, tree.root / "indexes", opts, PublishOptions(keep=10)).version  # now CURRENT
    flat = tree.indexes[1]  # a FAISS Flat index over the same model
    parent = tree.root / "indexes" / "tiny"
    with running(settings(tree)) as url, httpx.Client(base_url=url, timeout=30) as client:
        info = client.get("/models").json()["index"]  # the service started on the ScaNN bundle
        assert (info["version"], info["type"], info["factory"], info["num_items"]) == (
            scann,
            "scann",
            "ScaNN10,AH2",
            1000,
        )
        version, first = _answer(client, {"user_id": "u012", "k": 40})
        assert version == scann and len(first) == 40 == len(set(first))
        # excluding the user's 30 best items still answers 40, none of them excluded
        body = {"user_id": "u012", "k": 40, "exclude": first[:30]}
        _, excluded = _answer(client, body)
        assert len(excluded) == 40 and not set(excluded) & set(first[:30])
        _, deep = _answer(client, {"user_id": "u012", "k": 100, "exclude": first})
        assert len(deep) == 100 == len(set(deep)) and not set(deep) & set(first)

        answers: dict[str, list[str]] = {}
        for version in (flat, scann, flat, scann):
            point_current(parent, version, PublishOptions(keep=10))
            assert client.post("/admin/reload", headers=TOKEN).json()["status"] == "reloaded"
            served, items = _answer(client, body)
            assert served == version and len(items) == 40 and not set(items) & set(first[:30])
            assert answers.setdefault(version, items) == items  # each bundle answers the same way every time
        overlap = len(set(answers[flat]) & set(answers[scann])) / 40
        assert overlap >= 0.9  # ScaNN tuned to recall 0.95 against the exact Flat answer

        stop = threading.Event()
        seen: list[tuple[int, str | None, int]] = []

        def hammer() -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                while not stop.is_set():
                    r = c.post("/recall", json=body)
                    ok = r.status_code == 200
                    seen.append((r.status_code, r.json()["index_version"] if ok else None, len(r.json()["items"])))

        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for t in threads:
            t.start()
        for n in range(10):
            point_current(parent, (flat, scann)[n % 2], PublishOptions(keep=10))
            assert client.post("/admin/reload", headers=TOKEN).json()["status"] == "reloaded"
        stop.set()
        for t in threads:
            t.join()
    assert seen and all(code == 200 and count == 40 for code, _, count in seen)
    assert {version for _, version, _ in seen} <= {flat, scann}
