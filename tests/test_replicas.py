"""Two `quiver-serve` replicas over one artifacts folder and one redis-server: compose's `api` scaled to 2, without
Docker.

The replicas share exactly what compose shares, the artifacts folder (the volume) and Redis, and nothing else: no
port, no process. One `quiver-index build` publishes a new (model, index) pair; its announcement on Redis must reach
both replicas within a second of the build's exit, while a steady /recall load on both fails no request and gets no
answer that mixes versions. Each replica's reload poll is off, so only the announcement can move it.
"""

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import RedisProcess
from tests.serving import Tree, quiver_serve

BIN = Path(sys.executable).parent
SWAP_BUDGET_S = 1.0  # the bound: every replica serves the new version this long after the build exits


@dataclass(frozen=True)
class Answer:
    replica: int
    sent: float  # time.monotonic() when the request was sent
    status: int  # 0: no HTTP answer at all (connection refused, reset, timed out)
    versions: tuple[str, str] | None  # (model_version, index_version) of a 200
    error: str = ""


class Load:
    """Steady /recall traffic on every replica from a few threads, each on its own keep-alive connection, paced so
    that the replicas, the build and this process share two cores without starving the swap."""

    def __init__(self, urls: list[str], threads_per_replica: int = 2, pause_s: float = 0.02) -> None:
        self.urls = urls
        self.pause_s = pause_s
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(r, t), daemon=True)
            for r in range(len(urls))
            for t in range(threads_per_replica)
        ]

    def _run(self, replica: int, seed: int) -> None:
        with httpx.Client(base_url=self.urls[replica], timeout=10) as client:
            n = seed
            while not self._stop.is_set():
                body = {"user_id": f"u{n % 200:03d}", "k": 10, "rerank": n % 2 == 0}
                sent = time.monotonic()
                try:
                    r = client.post("/recall", json=body)
                    ok = r.status_code == 200
                    versions = (r.json()["model_version"], r.json()["index_version"]) if ok else None
                    answer = Answer(replica, sent, r.status_code, versions, "" if ok else r.text[:300])
                except httpx.HTTPError as err:
                    answer = Answer(replica, sent, 0, None, f"{type(err).__name__}: {err}")
                with self._lock:
                    self.answers.append(answer)
                n += 2
                time.sleep(self.pause_s)

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def _served(url: str) -> tuple[str, str]:
    body = httpx.get(f"{url}/readyz", timeout=5).json()
    return body["model_version"], body["index_version"]


@pytest.fixture
def replicas(serving_tree: Tree, tmp_path: Path) -> Iterator[tuple[Tree, str, list[str]]]:
    """(tree, redis url, [replica urls]): one artifacts copy serving pair 0, one redis-server, two replicas."""
    tree = serving_tree.copy(tmp_path / "artifacts")
    tree.point(0)
    redis = RedisProcess(tmp_path).start()
    try:
        with ExitStack() as stack:
            urls = [
                stack.enter_context(quiver_serve(tree.root, redis.url, tmp_path / f"replica{i}.log")) for i in range(2)
            ]
            yield tree, redis.url, urls
    finally:
        redis.stop()


def test_one_publish_reaches_every_replica_under_load(replicas: tuple[Tree, str, list[str]]) -> None:
    tree, redis_url, urls = replicas
    old = (tree.models[0], tree.indexes[0])
    assert [_served(url) for url in urls] == [old, old]
    # A layout no version of the tree has: a genuinely new index, built for the other model version, so the whole
    # (model, index) pair changes on both replicas.
    build = [
        str(BIN / "quiver-index"), "build", "--model", str(tree.root / "models" / "tiny" / tree.models[1]),
        "--index", "HNSW16,Flat", "--out", str(tree.root / "indexes"), "--threads", "1", "--queries", "200",
        "--no-progress",
    ]  # fmt: skip
    env = os.environ | {"QUIVER_REDIS_URL": redis_url, "OMP_NUM_THREADS": "1"}

    with Load(urls) as load:
        time.sleep(0.5)  # both replicas answering the old pair before the publish
        done = subprocess.run(build, env=env, capture_output=True, text=True, timeout=120)
        exited = time.monotonic()
        assert done.returncode == 0, done.stderr
        published = json.loads(done.stdout.splitlines()[-1])
        new = (tree.models[1], published["version"])
        assert published["model_version"] == tree.models[1] and published["version"] not in tree.indexes

        switched: dict[int, float] = {}  # replica -> when /readyz first showed the new pair
        while len(switched) < len(urls) and time.monotonic() < exited + 10:
            for i, url in enumerate(urls):
                if i not in switched and _served(url) == new:
                    switched[i] = time.monotonic()
            time.sleep(0.01)
        time.sleep(0.5)  # the load goes on past the swap

    late = {i: round(t - exited, 3) for i, t in switched.items()}
    assert len(switched) == len(urls), f"replicas {set(range(len(urls))) - set(switched)} never served {new}"
    assert all(delay <= SWAP_BUDGET_S for delay in late.values()), f"seconds after the build exited: {late}"

    answers = load.answers
    failed = [a for a in answers if a.status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed, first: {failed[:3]}"
    assert {a.versions for a in answers} <= {old, new}, "an answer mixed a model and an index of two publishes"
    for i in range(len(urls)):
        mine = [a for a in answers if a.replica == i]
        assert {a.versions for a in mine} == {old, new}, f"replica {i}: the load did not span its swap"
        stale = [a for a in mine if a.sent > switched[i] and a.versions == old]
        assert not stale, f"replica {i} answered the old pair after serving the new one: {stale[:3]}"
    assert len(answers) >= 40, f"too little load to mean anything: {len(answers)} answers"
