"""Two worker processes (QUIVER_WORKERS=2) behind one port: both serve, keep-alive connections spread evenly over
them, a worker that dies is replaced without a failed request, and a hot swap asked of one reaches both.

A real `quiver-serve` process with a real redis-server; each worker listens on its own SO_REUSEPORT socket and the
kernel assigns each fresh connection to one of them by its addresses, so many fresh connections sample both."""

import os
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from index.bundle import INDEX_FILE
from service.runtime import find_target, load_runtime
from service.workers import balanced
from tests.conftest import PROC_MAPS, mapped
from tests.serving import BIN, Tree, quiver_serve, settings

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


def _sockets(port: int, state: str) -> set[str]:
    """Inodes of the TCP sockets on local port `port` in a state (01: established, 0A: listening)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            f = row.split()
            if f[3] == state and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f[9])
    return inodes


def _server_side(port: int, state: str = "01") -> Counter[int]:
    """Sockets on local port `port` in a TCP state, by the process holding them."""
    inodes = _sockets(port, state)
    held: Counter[int] = Counter()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
        held[int(proc.name)] += sum(link.startswith("socket:[") and link[8:-1] in inodes for link in links)
    return +held


def _keep_alive(port: int, n: int) -> list[socket.socket]:
    """n connections, each answered once (so a worker has accepted it) and kept open."""
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        conns.append(s)
    return conns


@pytest.mark.skipif(not balanced(), reason="SO_REUSEPORT balancing is Linux-only (elsewhere uvicorn's workers run)")
def test_keep_alive_connections_spread_over_both_workers(two_workers: tuple[Tree, str]) -> None:
    _, url = two_workers
    port = int(url.rsplit(":", 1)[1])
    conns = _keep_alive(port, 32)
    try:
        held = _server_side(port)
    finally:
        for s in conns:
            s.close()
    # one socket per worker, connections hashed over them: each worker holds a fair share (uvicorn's shared socket
    # gave 29/3 and 32/0); P(a binomial(32, 1/2) share < 6) is about 1e-4
    assert len(held) == 2 and sum(held.values()) == 32, held
    assert min(held.values()) >= 6, held


@pytest.mark.skipif(not balanced(), reason="the SO_REUSEPORT supervisor is Linux-only")
def test_a_killed_worker_is_replaced_and_no_request_fails(two_workers: tuple[Tree, str], tmp_path: Path) -> None:
    _, url = two_workers
    port = int(url.rsplit(":", 1)[1])
    conns = _keep_alive(port, 16)
    before = set(_server_side(port))
    for s in conns:
        s.close()
    assert len(before) == 2
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    # connections hashed to its socket while it dies are reset, as in-flight ones are. Its socket is gone when its
    # last thread has exited, which can be after /proc shows it a zombie (the group leader exits first, and a busy
    # machine may run the other threads' exit later): that gap reset ~1 fresh connection in 5 runs of the full suite
    while len(_sockets(port, "0A")) > 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    while True:  # fresh connections meanwhile: the survivor's socket takes them all, none is refused or fails
        try:
            r = httpx.post(f"{url}/recall", json={"user_id": "u001", "k": 5}, timeout=30)
            assert r.status_code == 200 and len(r.json()["items"]) == 5
            conns = _keep_alive(port, 16)
        except (OSError, httpx.TransportError) as err:
            log = (tmp_path / "serve.log").read_text(errors="replace")[-4000:]
            seen = f"victim {victim}, listening {_server_side(port, '0A')}, connected {_server_side(port)}"
            raise AssertionError(f"{type(err).__name__}: {err}; {seen}; log:\n{log}") from err
        now = set(_server_side(port))
        for s in conns:
            s.close()
        if len(now) == 2 and victim not in now:
            break  # the replacement listens and takes its share
        assert time.monotonic() < deadline, f"no replacement worker after 60 s: {now}"
        time.sleep(0.2)


@pytest.mark.skipif(not balanced(), reason="the SO_REUSEPORT supervisor is Linux-only")
def test_a_port_in_use_stops_the_supervisor_with_an_error(tmp_path: Path) -> None:
    """Every restart would fail the same way: the supervisor exits non-zero instead of restarting forever."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: nobody else may bind it
        taken.listen()
        port = taken.getsockname()[1]
        env = os.environ | {"QUIVER_ARTIFACTS": str(tmp_path), "QUIVER_PORT": str(port), "QUIVER_WORKERS": "2"}
        done = subprocess.run([str(BIN / "quiver-serve")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"cannot bind 127.0.0.1:{port}" in done.stderr


@pytest.mark.skipif(not PROC_MAPS.exists(), reason="needs Linux /proc to see the mapping")
def test_the_served_faiss_index_is_memory_mapped(serving_tree: Tree, tmp_path: Path) -> None:
    """What lets workers share the index's pages: the service's loader maps the file instead of copying it."""
    tree = serving_tree.copy(tmp_path / "artifacts")  # file paths no other test in this process has mapped
    rt = load_runtime(find_target(settings(tree)))
    served = tree.root / "indexes" / "tiny" / rt.index.version / INDEX_FILE
    assert served.is_file() and mapped(served)
    assert rt.recall([])[0] == []  # and it serves
