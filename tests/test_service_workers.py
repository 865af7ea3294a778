"""Two worker processes (QUIVER_WORKERS=2) behind one port: both serve, and a hot swap asked of one reaches both.

A real `quiver-serve` process with a real redis-server; each fresh connection lands on whichever worker accepts it,
so many fresh connections sample both."""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.serving import Tree

TOKEN = {"X-Quiver-Admin-Token": "s3cret"}


@pytest.fixture
def two_workers(serving_tree: Tree, tmp_path: Path, redis_url: str) -> Iterator[tuple[Tree, str]]:
    tree = serving_tree.copy(tmp_path / "artifacts")
    tree.point(0)
    port = free_port()
    env = os.environ | {
        "QUIVER_ARTIFACTS": str(tree.root),
        "QUIVER_MODEL": "tiny",
        "QUIVER_RANKER": "tiny_tdm",
        "QUIVER_REDIS_URL": redis_url,
        "QUIVER_ADMIN_TOKEN": "s3cret",
        "QUIVER_RELOAD_POLL_S": "0",  # only the admin call and its announcement can move a worker
        "QUIVER_TORCH_THREADS": "1",
        "QUIVER_WORKERS": "2",
        "QUIVER_PORT": str(port),
        "QUIVER_LOG_LEVEL": "warning",
    }
    serve = Path(sys.executable).parent / "quiver-serve"
    proc = subprocess.Popen([str(serve)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "quiver-serve exited"
            try:
                if all(httpx.get(f"{url}/readyz", timeout=5).status_code == 200 for _ in range(20)):
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "two workers did not become ready"
            time.sleep(0.2)
        yield tree, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
