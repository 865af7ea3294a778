"""QUIVER_MODEL_PROCESS: /recall's tower and search in a child process, through a real uvicorn server.

The answers must be the in-process ones exactly (the same triple, loaded from the same folders), for every kind of
request the pipeline serves; a hot swap must reach the child; a child that dies costs at most the batch it held,
and the next request is answered by a new one."""

import asyncio
import contextlib
import multiprocessing as mp
import os
import select
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from index.filter import Filter
from models.errors import QuiverError
from service.app import create_app
from service.batcher import MicroBatcher
from service.cpus import process_threads
from service.metrics import Metrics
from service.model_process import (
    HEAD,
    ModelProcess,
    Rendered,
    _answer_run,
    decode_answer,
    decode_batch,
    decode_job,
    encode_answer,
    encode_batch,
    next_run,
)
from service.reload import RuntimeHolder
from service.runtime import BatchTimings, Found, RecallJob, find_target, load_runtime
from service.sched_slice import get_slice_us, set_slice_us
from service.userstate import UserState, resolve
from tests.serving import Tree, quiver_serve, running, running_app, settings
from tests.test_service_sched_slice import kernel_takes_slices

TOKEN = {"X-Quiver-Admin-Token": "s3cret"}
# What the pipeline does differently by request: stored and request histories, exclusions, filters, rerank, an
# unknown user (popularity), micro-batches of mixed widths.
REQUESTS: list[dict[str, Any]] = [
    {"user_id": "u001", "k": 10},
    {"user_id": "u002", "k": 25, "exclude_seen": False},
    {"user_id": "u003", "k": 7, "history": ["i0001", "i0002", "i0003"]},
    {"user_id": "u004", "k": 10, "exclude": ["i0005", "i0006"]},
    {"user_id": "u005", "k": 10, "filter": {"price": {"lt": 50.0}}},
    {"user_id": "u006", "k": 5, "rerank": True},
    {"user_id": "nobody-at-all", "k": 10},
]


def _answers(url: str) -> list[dict[str, Any]]:
    with httpx.Client(base_url=url, timeout=60) as c:
        out = []
        for body in REQUESTS:
            r = c.post("/recall", json=body)
            assert r.status_code == 200, r.text
            out.append(r.json())
        return out


def _concurrent(url: str, n: int = 48) -> list[dict[str, Any]]:
    """n requests at once, so the micro-batcher forms batches and keeps two in flight."""

    async def go() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            rs = await asyncio.gather(*(c.post("/recall", json=REQUESTS[i % len(REQUESTS)]) for i in range(n)))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200][:1]
        return [r.json() for r in rs]

    return asyncio.run(go())


@pytest.fixture(scope="module")
def tree(serving_tree: Tree, tmp_path_factory: pytest.TempPathFactory) -> Tree:
    t = serving_tree.copy(tmp_path_factory.mktemp("model-process") / "artifacts")
    t.point(1)
    return t


@pytest.fixture(scope="module")
def in_process(tree: Tree) -> list[dict[str, Any]]:
    with running(settings(tree)) as url:
        return _answers(url)


def test_answers_are_the_in_process_ones(tree: Tree, in_process: list[dict[str, Any]]) -> None:
    with running(settings(tree, model_process=True)) as url:
        assert _answers(url) == in_process
        many = _concurrent(url)
    for i, got in enumerate(many):  # batched: the tower's floats may differ in the last bits from a lone request
        want = in_process[i % len(REQUESTS)]["items"]
        assert [x["item_id"] for x in got["items"]] == [x["item_id"] for x in want]
        assert [x["score"] for x in got["items"]] == pytest.approx([x["score"] for x in want], abs=1e-5)
    assert in_process[4]["filter_matches"] and in_process[6]["degraded"]  # the filter and fallback paths ran


def test_a_hot_swap_reaches_the_model_process(tree: Tree, in_process: list[dict[str, Any]], tmp_path: Path) -> None:
    other = tree.copy(tmp_path / "artifacts")
    other.point(0)
    with running(settings(other)) as url:
        before = _answers(url)  # pair 0, in-process
    with running(settings(other, model_process=True)) as url:
        assert _answers(url) == before
        other.point(1)
        r = httpx.post(f"{url}/admin/reload", headers=TOKEN, timeout=60)
        assert r.status_code == 200 and r.json()["status"] == "reloaded"
        after = _answers(url)
    assert [a["index_version"] for a in after] == [other.indexes[1]] * len(REQUESTS)
    assert after == [a | {"index_version": other.indexes[1]} for a in in_process]  # pair 1's answers, exactly
    assert [a["items"] for a in after] != [a["items"] for a in before]


def test_a_killed_model_process_is_replaced(tree: Tree, in_process: list[dict[str, Any]]) -> None:
    app = create_app(settings(tree, model_process=True))
    with running_app(app) as url:
        remote: ModelProcess = app.state.services.model_process
        first = remote.pid
        assert first is not None and _answers(url) == in_process
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while remote._alive():  # the handle notices the death the way the next batch will
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _answers(url) == in_process  # the next batch starts a new child that holds the served triple
        assert remote.pid not in (None, first)
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/readyz").status_code == 200


def test_an_answer_out_of_step_costs_a_503_at_most_and_a_new_child(
    tree: Tree, in_process: list[dict[str, Any]]
) -> None:
    app = create_app(settings(tree, model_process=True))
    with running_app(app) as url:
        remote: ModelProcess = app.state.services.model_process
        first = remote.pid
        assert remote._batches is not None
        # a batch nobody waits for: its answer has no request to go to, so the pipe can no longer be trusted to
        # pair answers with batches; the child is replaced, and no request may get another batch's items
        remote._batches.send_bytes(b'{"seq": -1, "versions": ["x", "y", null], "jobs": []}')
        statuses = []
        for _ in range(3):
            r = httpx.post(f"{url}/recall", json=REQUESTS[0], timeout=30)
            statuses.append(r.status_code)
            if r.status_code == 200:
                assert r.json() == in_process[0]
            else:
                assert r.status_code == 503 and "model process" in r.json()["detail"]
        assert statuses.count(503) <= 1 and statuses[-1] == 200, statuses
        assert remote.pid not in (None, first)  # a new child


def test_two_workers_each_with_a_model_process(tree: Tree, tmp_path: Path, redis_url: str) -> None:
    """The console script compose runs: QUIVER_WORKERS=2, each worker with its own model process."""
    with quiver_serve(tree.root, redis_url, tmp_path / "serve.log", ready=10, QUIVER_WORKERS="2",
                      QUIVER_MODEL_PROCESS="true") as url:  # fmt: skip
        for _ in range(10):  # fresh connections: both workers answer
            r = httpx.post(f"{url}/recall", json={"user_id": "u001", "k": 6}, timeout=30)
            assert r.status_code == 200 and len(r.json()["items"]) == 6


def test_batches_cross_the_pipe_unchanged(tree: Tree) -> None:
    rt = load_runtime(find_target(settings(tree)))
    known = rt.index.ids[:2].tolist()
    state = UserState("u1", {"user_id": "u1", "age": 3}, [known[0], "b"], "redis", True, ["x"], [10, 20])
    other = resolve("u002", rt.users, None, False, ["i0001", "i0002", "i0003"], None, None)
    nobody = resolve("nobody", rt.users, None, False, None, None, None)
    assert nobody.popularity_only and not state.popularity_only
    flt = Filter((("category", "in", ("A", "B")), ("price", "range", (("lt", 5.0),)), ("stock", "is", True)))
    jobs = [
        RecallJob(state, 10, [known[1], "nope", known[0]], flt),
        RecallJob(nobody, 4, [known[0]]),
        RecallJob(other, 3, [], None, render=True),
    ]
    head, inputs = decode_batch(encode_batch(9, rt, jobs, rt.profile_inputs(jobs)))
    assert head["seq"] == 9 and tuple(head["versions"]) == rt.versions
    backs = [decode_job(j) for j in head["jobs"]]
    for back, job in zip(backs, jobs, strict=True):
        assert back.render == job.render and back.fetch == job.fetch
        assert back.filter == job.filter and (back.filter is None or hash(back.filter.key) == hash(job.filter.key))
        # the exclusions arrive as ids; the child drops an id the index does not know as the lookup drops it
        assert back.exclude == job.exclude and rt.excluded(back) == [rt.rows[i] for i in job.exclude if i != "nope"]
        assert back.state.user_id == job.state.user_id
        assert back.state.popularity_only == job.state.popularity_only  # the tower runs for the same jobs
        assert back.state.history == (job.state.history if not job.state.popularity_only else [])
    # the personalised jobs' profiles arrive encoded, array for array, in job order; the child adds the histories
    want = rt.tower_inputs([state, other])
    assert inputs is not None and list(inputs) == list(rt.inputs.profiles([state, other]))
    inputs |= rt.inputs.histories([b.state for b in backs if not b.state.popularity_only])
    assert sorted(inputs) == sorted(want)
    for name, a in want.items():
        assert inputs[name].dtype == a.dtype and inputs[name].shape == a.shape and (inputs[name] == a).all(), name
    assert (rt.tower(inputs)[0] == rt.user_vectors([state, other])[0]).all()
    # a batch of unknown users only carries no inputs; bytes beyond a batch's inputs are refused
    assert decode_batch(encode_batch(3, rt, [jobs[1]], rt.profile_inputs([jobs[1]])))[1] is None
    with pytest.raises(ValueError):
        decode_batch(encode_batch(9, rt, jobs, rt.profile_inputs(jobs)) + b"\0")


def test_answers_cross_the_pipe_as_found_or_as_the_items_json() -> None:
    state = UserState("u1", None, [], "bundle", True, [], None)
    jobs = [RecallJob(state, 2, [], render=True), RecallJob(state, 2, []), RecallJob(state, 0, [], render=True)]
    found = [Found(["a", '\u00e9"q'], [0.5, -1.25e-3], [0, 1]), Found(["c"], [2.0], [0]), Found([], [], [])]
    back = decode_answer(encode_answer(7, jobs, found, BatchTimings(0.25, 0.5)))
    assert (back["seq"], back["tower"], back["search"]) == (7, 0.25, 0.5)
    first, second, third = back["found"]
    assert isinstance(first, Rendered) and isinstance(third, Rendered) and second == found[1]
    # what the pipeline would have built from the Found, item for item
    assert orjson.loads(first.items_json) == [
        {"item_id": "a", "score": 0.5, "interest": 0},
        {"item_id": '\u00e9"q', "score": -1.25e-3, "interest": 1},
    ]
    assert orjson.loads(third.items_json) == []


def test_batches_that_queued_together_are_computed_as_one_and_answered_each(tree: Tree) -> None:
    rt = load_runtime(find_target(settings(tree)))
    state = [resolve(u, rt.users, None, False, None, None, None) for u in ("u001", "u002", "u003", "nobody")]
    top = rt.recall([RecallJob(state[1], 1, [])])[0][0].item_ids  # the item u002 would get first, excluded below
    first = [RecallJob(state[0], 5, [], render=True), RecallJob(state[1], 3, top)]
    second = [RecallJob(state[2], 4, [], render=True), RecallJob(state[3], 2, [])]
    msgs = [decode_batch(encode_batch(s, rt, jobs, rt.profile_inputs(jobs))) for s, jobs in ((7, first), (8, second))]
    outs = [decode_answer(out) for out in _answer_run(rt, msgs)]
    assert [o["seq"] for o in outs] == [7, 8]
    for out, jobs in zip(outs, (first, second), strict=True):
        alone, _ = rt.recall(jobs)  # each batch by itself
        for got, job, want in zip(out["found"], jobs, alone, strict=True):
            if job.render:
                items = orjson.loads(got.items_json)
                got = Found([i["item_id"] for i in items], [i["score"] for i in items], [i["interest"] for i in items])
            assert got.item_ids == want.item_ids and got.interests == want.interests and len(got.item_ids) == job.fetch
            assert got.scores == pytest.approx(want.scores, abs=1e-5)
            assert not set(got.item_ids) & set(job.exclude)
    # a triple the child does not hold fails every batch of the run, by its own seq
    outs = [decode_answer(out) for out in _answer_run(None, msgs)]
    assert [(o["seq"], "not loaded" in o["error"]) for o in outs] == [(7, True), (8, True)]


def test_a_run_merges_queued_batches_up_to_the_batch_cap() -> None:
    """The child computes what queued as one run, but never more than QUIVER_BATCH_MAX_SIZE requests: a batch read
    past the cap starts the next run instead (Settings.batch_cap says why)."""
    read, write = mp.Pipe(duplex=False)
    queued = select.poll()
    queued.register(read.fileno(), select.POLLIN)

    def send(seq: int, n: int) -> None:  # a batch of n popularity-only jobs, no profiles
        head = orjson.dumps(
            {
                "seq": seq,
                "versions": ["m", "i", None],
                "jobs": [["u", False, 5, [], None, True, [], None]] * n,
                "inputs": None,
            }
        )
        write.send_bytes(HEAD.pack(len(head)) + head)

    for seq, n in enumerate((3, 4, 2, 8)):
        send(seq, n)
    run, carry = next_run(read, queued, None, 8)
    assert [b[0]["seq"] for b in run] == [0, 1] and carry is not None and carry[0]["seq"] == 2  # 3 + 4 + 2 > 8
    run, carry = next_run(read, queued, carry, 8)
    assert [b[0]["seq"] for b in run] == [2] and carry is not None and carry[0]["seq"] == 3  # 2 + 8 > 8
    run, carry = next_run(read, queued, carry, 8)
    assert [b[0]["seq"] for b in run] == [3] and carry is None  # at the cap: nothing more is read
    for seq, n in enumerate((3, 4, 2)):
        send(seq, n)
    run, carry = next_run(read, queued, None, 64)  # under a larger cap everything queued is one run
    assert [len(b[0]["jobs"]) for b in run] == [3, 4, 2] and carry is None
    assert not queued.poll(0)
    write.close()
    with pytest.raises(EOFError):  # the HTTP process gone: the child's loop ends
        next_run(read, queued, None, 8)
    read.close()


def test_a_load_the_model_process_refuses_refuses_the_triple(tree: Tree) -> None:
    def refuse(target: object) -> None:
        raise QuiverError("the model process could not load it")

    holder = RuntimeHolder(settings(tree), Metrics(), also_load=refuse)
    outcome = asyncio.run(holder.reload())
    assert outcome.status == "refused" and "could not load" in (outcome.reason or "")
    assert holder.current is None


@pytest.mark.parametrize("in_flight", [1, 2, 3])
def test_microbatcher_keeps_in_flight_batches_running_at_once(in_flight: int) -> None:
    running_now, most = 0, 0
    lock = threading.Lock()

    def run(owner: str, jobs: Sequence[int]) -> list[int]:
        nonlocal running_now, most
        with lock:
            running_now += 1
            most = max(most, running_now)
        time.sleep(0.05)
        with lock:
            running_now -= 1
        return [j * 2 for j in jobs]

    async def go() -> list[int]:
        with ThreadPoolExecutor(max_workers=in_flight) as pool:
            b: MicroBatcher[str, int, int] = MicroBatcher(run, pool, max_size=2, max_wait_s=0, in_flight=in_flight)
            b.start()
            out = await asyncio.gather(*(b.submit("x", i) for i in range(12)))
            await b.stop()
            return list(out)

    assert asyncio.run(go()) == [i * 2 for i in range(12)]
    assert most == in_flight


@pytest.fixture(autouse=True)
def _no_child_left() -> Iterator[None]:
    yield
    import multiprocessing

    assert not [p for p in multiprocessing.active_children() if p.name == "quiver-model"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning apart needs two CPUs")
def test_model_cpus_auto_pins_the_child_and_the_http_process_apart(
    tree: Tree, in_process: list[dict[str, Any]]
) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    app = create_app(settings(tree, model_process=True, model_cpus="auto"))
    with running_app(app) as url:  # this test process is the HTTP process here
        remote: ModelProcess = app.state.services.model_process
        assert _answers(url) == in_process
        assert remote.pid is not None
        child_threads = [int(t) for t in os.listdir(f"/proc/{remote.pid}/task")]
        assert {t: os.sched_getaffinity(t) for t in child_threads} == {t: {allowed[-1]} for t in child_threads}
        assert os.sched_getaffinity(0) == set(allowed[:-1])
    assert os.sched_getaffinity(0) == before  # put back when the model process closes


@pytest.mark.skipif(not kernel_takes_slices(), reason="custom scheduler slices need Linux 6.12 or later")
def test_sched_slice_reaches_the_http_process_and_every_thread_of_the_model_process(
    tree: Tree, in_process: list[dict[str, Any]]
) -> None:
    app = create_app(settings(tree, model_process=True, sched_slice_us=300))
    try:
        with running_app(app) as url:  # this test process is the HTTP process here
            remote: ModelProcess = app.state.services.model_process
            assert _answers(url) == in_process
            assert remote.pid is not None
            child_threads = [int(t) for t in os.listdir(f"/proc/{remote.pid}/task")]
            assert {t: get_slice_us(t) for t in child_threads} == {t: 300 for t in child_threads}
            assert get_slice_us() == 300
    finally:
        for tid in process_threads():  # the rest of the suite runs on the kernel's default
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                set_slice_us(0, tid)
