"""Two worker processes (QUIVER_WORKERS=2) behind one port: both serve, and a hot swap asked of one reaches both.

A real `quiver-serve` process with a real redis-server; each fresh connection lands on whichever worker accepts it,
so many fresh connections sample both."""

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving import Tree, quiver_serve

TOKEN = {"X-Quiver-Admin-Token": "s3cret"}


@pytest.fixture
def two_workers(serving_tree: Tree, tmp_path: Path, redis_url: str) -> Iterator[tuple[Tree, str]]:
    tree = serving_tree.copy(tmp_path / "artifacts")
    tree.point(0)
    # the reload poll is off (quiver_serve's default): only the admin call and its announcement can move a worker
    with quiver_serve(
        tree.root, redis_url, tmp_path / "serve.log", ready=20, QUIVER_WORKERS="2", QUIVER_ADMIN_TOKEN="s3cret"
    ) as url:
        yield tree, url


def _versions_seen(url: str, n: int = 40) -> set[tuple[str, str]]:
    seen = set()
    for _ in range(n):  # a fresh connection each time: either worker may take it
        body = httpx.get(f"{url}/readyz", timeout=10).json()
        seen.add((body["model_version"], body["index_version"]))
    return seen


def test_an_admin_reload_reaches_both_workers(two_workers: tuple[Tree, str]) -> None:
    tree, url = two_workers
    assert _versions_seen(url) == {(tree.models[0], tree.indexes[0])}
    tree.point(1)
    r = httpx.post(f"{url}/admin/reload", headers=TOKEN, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "reloaded"
    deadline = time.monotonic() + 15
    while (seen := _versions_seen(url)) != {(tree.models[1], tree.indexes[1])}:
        assert time.monotonic() < deadline, f"a worker never followed the reload: {seen}"
        time.sleep(0.2)
    recall = httpx.post(f"{url}/recall", json={"user_id": "u001", "k": 7}, timeout=30)
    assert recall.status_code == 200 and len(recall.json()["items"]) == 7
