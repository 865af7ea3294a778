"""The model process (QUIVER_MODEL_PROCESS): /recall's user tower and index search in a process of their own, fed
the micro-batches over a pipe.

In one process the event loop (HTTP parsing, validation, user state, the JSON answer) and the model thread (the
tower's feature encoding, the search's bookkeeping) take turns on one GIL: the server answered at 0.45x the rate
of the same pipeline called directly, with one core busy and the other mostly idle (bench/README "serve.py"). Here
the HTTP process keeps everything else (user state, unknown-id reports, filters' validation, the ranker, /rank,
/events); its event loop writes each batch to the child and reads the answer when the pipe turns readable, so no
thread has to win the GIL back from a busy event loop per batch. The child runs `Runtime.recall` on the same
triple, loaded from the same folders.

Messages are JSON (orjson) over `multiprocessing` pipes (batches out, answers back, and a control pipe), never
pickled data:

    control (reloads, one at a time):  {"op": "load", "model": dir, "index": dir, "versions": [m, i, r]}
                                       -> {"ok": true} | {"error": "..."}
    batches -> answers (in order):     head {"seq": n, "versions": [m, i, r], "jobs": [job, ...],
                                                 "inputs": [[name, dtype, shape], ...] | null} + arrays
                                       -> head + items | {"seq": n, "error": "..."}
    A batch's head comes after 4 bytes of its length, then the personalised jobs' profile inputs
    (`Runtime.profile_inputs`), each array's raw bytes in the head's order. A job is [user_id, personalised, fetch,
    exclude ids, filter clauses, render, history ids, click times | null]: the HTTP process encodes the profiles (its
    memo of the bundle's rows), the child the histories and the exclusions, whose per-id label lookups cost the most.
    head: {"seq": n, "found": [[ids, scores, interests] | nbytes, ...], "tower": s, "search": s}, after 4 bytes of
    its length; then, for each job that asked for it (`RecallJob.render`: no rerank), its answer's `items` as
    JSON bytes, `nbytes` long, in job order.

The rendered items save the HTTP process, whose event loop every request shares, the answer's decoding, one dict
per item and their encoding (about 20 µs of a 100-item answer): it drops the bytes into the response as they came
(`orjson.Fragment`). Measured both ways at saturation: 3,672 req/s with the child rendering, 3,149 without.

Three batches are out at once: while the child computes one, the next already waits in the pipe and a third can
leave the moment it forms, rather than queueing in the HTTP process until an answer frees a slot (against two:
6-10% more requests a second at saturation and a lower p99 at half load in each of three interleaved pairs).
The child computes every batch it finds waiting as one (one tower pass, one search) and answers each by itself:
at light load the HTTP process hands over small batches as soon as they form, and the child's fixed cost per batch
is still paid once per turn, not once per small batch.
An answer is matched to the oldest batch still waiting and its `seq` checked: one out of step (which would hand a
batch another's items) fails that batch and replaces the child. The child keeps the two newest triples (a request
that began on the previous one finishes on it; a batch is split by runtime before it gets here) and loads on a
thread of its own, so a reload does not stop the batches. If the child dies, the batches out fail (503,
`ModelProcessDown`) and the next one starts a new child holding the triples the old one held.
"""

import asyncio
import logging
import math
import multiprocessing as mp
import os
import select
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orjson

from index.filter import Filter
from models.errors import QuiverError
from service.cpus import CpuPlan, pin_process, restore
from service.runtime import BatchTimings, Found, RecallJob, Runtime, Target, TowerInputs
from service.userstate import UserState

log = logging.getLogger("quiver.model_process")

IN_FLIGHT = 3  # batches sent to the child at once (MicroBatcher in_flight)
KEEP = 2  # triples the child holds: the served one and the one in-flight requests may still be on
Versions = tuple[str, str, str | None]
Batch = tuple[dict[str, Any], TowerInputs | None]  # a decoded batch: its head and the profiles' arrays


class ModelProcessDown(QuiverError):
    """The model process died or refused a batch; the requests of that batch get a 503."""


class Rendered(NamedTuple):
    """A job's answer as the JSON of its `items` list (RecallResponse.items, without rerank fields)."""

    items_json: bytes


HEAD = struct.Struct(">I")  # the length of an answer's JSON head


# ---------------------------------------------------------------- the wire format


def encode_job(job: RecallJob, rt: Runtime) -> list[Any]:
    """The excluded items and the history travel as item ids: their label lookups (about 1 µs an id in a 1M-item map,
    most of it cache misses) are the child's. They moved there when a cheaper index left the HTTP process setting the
    rate at saturation (bench/README "serve.py"). The profile travels encoded (`encode_batch`); the click times only
    where the model reads them."""
    clauses = job.filter.clauses if job.filter is not None else None
    state = job.state
    personal = not state.popularity_only
    history = state.history if personal else []
    times = state.history_time if personal and rt.reads_time else None
    return [state.user_id, personal, job.fetch, job.exclude, clauses, job.render, history, times]


def _tuples(value: Any) -> Any:
    """JSON turned the filter's tuples into lists; its clauses are compared and hashed as tuples."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def decode_job(row: list[Any]) -> RecallJob:
    user_id, personal, fetch, exclude, clauses, render, history, times = row
    # the child reads whether the tower runs (UserState.popularity_only: not known and no history) and the history;
    # the profile arrived encoded
    state = UserState(user_id, {}, history, "", bool(personal), [], times)
    flt = Filter(_tuples(clauses)) if clauses is not None else None
    return RecallJob(state, fetch, exclude, flt, render)


def encode_batch(seq: int, rt: Runtime, jobs: Sequence[RecallJob], inputs: TowerInputs | None) -> bytes:
    """A batch for the child: its head, then its profile inputs (`rt.profile_inputs(jobs)`) as raw arrays."""
    inputs = inputs or {}
    arrays = [np.ascontiguousarray(a) for a in inputs.values()]
    head = orjson.dumps(
        {
            "seq": seq,
            "versions": rt.versions,
            "jobs": [encode_job(j, rt) for j in jobs],
            "inputs": [[name, a.dtype.str, a.shape] for name, a in zip(inputs, arrays, strict=True)] or None,
        }
    )
    return b"".join([HEAD.pack(len(head)), head, *(a.data for a in arrays)])


def decode_batch(data: bytes) -> Batch:
    """The head and the tower inputs (None: no personalised job)."""
    (n,) = HEAD.unpack_from(data)
    head = orjson.loads(data[HEAD.size : HEAD.size + n])
    if head.get("inputs") is None:
        return head, None
    at, inputs = HEAD.size + n, {}
    for name, dtype, shape in head["inputs"]:
        dt = np.dtype(dtype)
        count = math.prod(shape)
        # a copy: torch reads only writable arrays, and the message's bytes are not
        inputs[name] = np.frombuffer(data, dtype=dt, count=count, offset=at).reshape(shape).copy()
        at += count * dt.itemsize
    if at != len(data):
        raise ValueError(f"batch {head.get('seq')}: {len(data) - at} bytes beyond its inputs")
    return head, inputs


def render_items(found: Found) -> bytes:
    """The `items` of a /recall answer without rerank, as JSON."""
    return orjson.dumps(found.items())


def encode_answer(seq: int, jobs: Sequence[RecallJob], found: Sequence[Found], timings: BatchTimings) -> bytes:
    rendered = [render_items(f) if job.render else b"" for job, f in zip(jobs, found, strict=True)]
    head = orjson.dumps(
        {
            "seq": seq,
            "found": [len(r) if job.render else tuple(f) for job, f, r in zip(jobs, found, rendered, strict=True)],
            "tower": timings.user_tower,
            "search": timings.search,
        }
    )
    return b"".join([HEAD.pack(len(head)), head, *rendered])


def decode_answer(data: bytes) -> dict[str, Any]:
    """The head, its `found` holding a `Found` or a `Rendered` per job."""
    (n,) = HEAD.unpack_from(data)
    head = orjson.loads(data[HEAD.size : HEAD.size + n])
    at, found = HEAD.size + n, []
    for f in head.get("found", ()):
        if isinstance(f, int):
            found.append(Rendered(data[at : at + f]))
            at += f
        else:
            found.append(Found(*f))
    head["found"] = found
    return head


# ---------------------------------------------------------------- the child


def _error_answer(seq: Any, why: str) -> bytes:
    head = orjson.dumps({"seq": seq, "error": why[:1000]})
    return HEAD.pack(len(head)) + head


def _child_main(
    batches: Connection,
    answers: Connection,
    control: Connection,
    threads: int,
    cpus: list[int] | None,
    max_jobs: int,
) -> None:
    if cpus:  # QUIVER_MODEL_CPUS: every thread, including any torch or FAISS started while this module was imported
        pin_process(frozenset(cpus))
    import faiss
    import torch

    from service.reload import settle_heap
    from service.runtime import load_runtime

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    held: dict[Versions, Runtime] = {}
    lock = threading.Lock()

    def loader() -> None:
        while True:
            try:
                msg = orjson.loads(control.recv_bytes())
            except EOFError:
                return
            try:
                # loaded every time it is asked, as the HTTP process does (a forced reload after files were fixed
                # in place names the same versions); the ranker stays in the HTTP process
                versions: Versions = tuple(msg["versions"])  # type: ignore[assignment]
                rt = load_runtime(Target(Path(msg["model"]), Path(msg["index"]), None, versions))
                with lock:
                    held.pop(versions, None)
                    held[versions] = rt  # the newest last
                    for old in list(held)[:-KEEP]:
                        del held[old]
                settle_heap()
                reply: dict[str, Any] = {"ok": True}
            except Exception as err:  # reported to the reload, which refuses the triple
                reply = {"error": f"{type(err).__name__}: {err}"[:1000]}
            control.send_bytes(orjson.dumps(reply))

    threading.Thread(target=loader, name="quiver-model-loader", daemon=True).start()
    # `Connection.poll` builds a selector per call; one poll object asks the same in a single system call
    queued = select.poll()
    queued.register(batches.fileno(), select.POLLIN)
    carry: Batch | None = None
    while True:
        try:
            waiting, carry = next_run(batches, queued, carry, max_jobs)
        except EOFError:  # the HTTP process closed the pipe or died: nothing left to serve
            return
        start = 0
        for end in range(1, len(waiting) + 1):  # runs of batches on the same triple, in the order they came
            if end == len(waiting) or waiting[end][0]["versions"] != waiting[start][0]["versions"]:
                for out in _answer_run(held.get(tuple(waiting[start][0]["versions"])), waiting[start:end]):
                    answers.send_bytes(out)
                start = end


def next_run(
    batches: Connection, queued: select.poll, carry: Batch | None, max_jobs: int
) -> tuple[list[Batch], Batch | None]:
    """The batches the child computes next as one: the first (`carry`, read last time, or the next to arrive), then
    whatever else already queued, while the run holds at most `max_jobs` requests. Returns the run and the batch read
    beyond it, if any (the next run's first). Blocks only for the first."""
    run = [carry if carry is not None else decode_batch(batches.recv_bytes())]
    jobs = len(run[0][0]["jobs"])
    while jobs < max_jobs and queued.poll(0):
        batch = decode_batch(batches.recv_bytes())
        jobs += len(batch[0]["jobs"])
        if jobs > max_jobs:
            return run, batch
        run.append(batch)
    return run, None


def _answer_run(rt: Runtime | None, batches: list[Batch]) -> list[bytes]:
    """The answers to consecutive batches on one triple, computed as one batch (each gets its share of the time)."""
    msgs = [m for m, _ in batches]
    if rt is None:
        return [_error_answer(m["seq"], f"triple {m['versions']} is not loaded") for m in msgs]
    try:
        per_msg = [[decode_job(j) for j in m["jobs"]] for m in msgs]
        jobs = [job for batch in per_msg for job in batch]
        personal = [job.state for job in jobs if not job.state.popularity_only]
        inputs, t0 = None, time.perf_counter()
        if personal:  # the profiles from the HTTP process (none for a model without any), the histories encoded here
            parts = [inputs for _, inputs in batches if inputs is not None]
            profiles = {n: np.concatenate([p[n] for p in parts]) for n in parts[0]} if parts else {}
            inputs = profiles | rt.inputs.histories(personal)
        encoding = time.perf_counter() - t0
        found, timings = rt.recall(jobs, inputs)
        timings.user_tower += encoding
        total, at, outs = max(len(found), 1), 0, []
        for m, jobs in zip(msgs, per_msg, strict=True):
            share = len(jobs) / total
            mine = BatchTimings(timings.user_tower * share, timings.search * share)
            outs.append(encode_answer(m["seq"], jobs, found[at : at + len(jobs)], mine))
            at += len(jobs)
        return outs
    except Exception as err:
        return [_error_answer(m["seq"], f"{type(err).__name__}: {err}") for m in msgs]


# ---------------------------------------------------------------- the HTTP process's handle


class ModelProcess:
    """The HTTP process's end. Batches go out and their answers come back on the event loop: the answers pipe has a
    reader there, so an answer is handed to its waiting request without a thread and without waiting for the GIL
    (a model thread blocked on the pipe would have to win the GIL back from a busy event loop for every batch).
    Loads go over the control pipe from the reload's thread. Starting and replacing the child happen on the event
    loop (`_revive`, one at a time)."""

    def __init__(self, threads: int, cpus: CpuPlan | None, max_jobs: int) -> None:
        """cpus: where the child and this process run (QUIVER_MODEL_CPUS, service/cpus.py); None: anywhere.
        max_jobs: the most requests the child computes as one run (QUIVER_BATCH_MAX_SIZE)."""
        self.threads = threads
        self.max_jobs = max_jobs
        self.cpus = cpus
        self._unpinned: dict[int, set[int]] | None = None  # this process's threads' CPUs before pinning
        self._ctx = mp.get_context("spawn")  # a fresh interpreter: no fork of a process holding threads and locks
        self._loop: asyncio.AbstractEventLoop | None = None
        self._control_lock = threading.Lock()  # one load at a time
        self._revive_lock: asyncio.Lock | None = None
        self._targets: dict[Versions, Target] = {}  # what the child holds, to load again into a new one
        self._pending: deque[asyncio.Future[dict[str, Any]]] = deque()  # batches sent, oldest first
        self._sent = 0
        self._broken = False  # the child may be running but is not to be used (dead pipe, out of step, closing)
        self._proc: Any = None
        self._batches: Connection | None = None  # to the child (blocking writes)
        self._answers: Connection | None = None  # from the child (read when the event loop says it is readable)
        self._answered: select.poll | None = None  # whether an answer waits on _answers
        self._control: Connection | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Bind to the running event loop and start the child (from the app's lifespan)."""
        self._loop = asyncio.get_running_loop()
        self._revive_lock = asyncio.Lock()
        if self.cpus is not None and self.cpus.http is not None:  # threads started from here on inherit it
            self._unpinned = pin_process(self.cpus.http)
        await self._revive()

    def _alive(self) -> bool:
        return self._proc is not None and not self._broken and self._proc.is_alive()

    async def _revive(self) -> None:
        """A child that is alive, with its reader, holding every triple the last one held."""
        assert self._revive_lock is not None
        async with self._revive_lock:
            if self._alive():
                return
            if self._proc is not None:
                log.warning("model process gone (exit %s): starting a new one", self._proc.exitcode)
            self._stop_reading("model process died before answering this batch")
            await asyncio.to_thread(self._respawn)
            assert self._loop is not None and self._answers is not None
            fd = self._answers.fileno()
            self._answered = select.poll()  # `Connection.poll` would build a selector on every call
            self._answered.register(fd, select.POLLIN)
            self._loop.add_reader(fd, self._on_readable)
            os.set_blocking(fd, True)  # the loop only polls it; a read takes a whole answer, however it arrives

    def _respawn(self) -> None:
        with self._control_lock:
            self._close_child()
            batches_in, batches = self._ctx.Pipe(duplex=False)  # (read end, write end)
            answers, answers_out = self._ctx.Pipe(duplex=False)
            control, control_child = self._ctx.Pipe()
            cpus = sorted(self.cpus.model) if self.cpus is not None else None
            proc = self._ctx.Process(
                target=_child_main,
                args=(batches_in, answers_out, control_child, self.threads, cpus, self.max_jobs),
                name="quiver-model",
                daemon=True,
            )
            proc.start()
            for end in (batches_in, answers_out, control_child):
                end.close()
            self._proc, self._batches, self._answers, self._control = proc, batches, answers, control
            self._sent, self._broken = 0, False
            log.info("model process started (pid %s)", proc.pid)
            for target in self._targets.values():
                self._ask(target)

    def _ask(self, target: Target) -> None:
        assert self._control is not None
        msg = {"op": "load", "model": str(target.model), "index": str(target.index), "versions": target.versions}
        self._control.send_bytes(orjson.dumps(msg))
        reply = orjson.loads(self._control.recv_bytes())
        if "error" in reply:
            raise QuiverError(f"model process: {reply['error']}")

    def load(self, target: Target) -> None:
        """Load a triple in the child (blocking: the reload's thread; batches go on meanwhile). Raises if the child
        refuses it, which refuses the triple."""
        if not self._alive() and self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._revive(), self._loop).result()
        with self._control_lock:
            try:
                self._ask(target)
            except (EOFError, OSError) as err:
                raise QuiverError(f"model process died while loading ({type(err).__name__})") from None
            self._targets.pop(target.versions, None)
            self._targets[target.versions] = target  # the newest last
            for old in list(self._targets)[:-KEEP]:
                del self._targets[old]

    def _on_readable(self) -> None:
        """Event-loop callback: hand each complete answer to the oldest batch still waiting (the child answers in
        the order it was sent)."""
        answers, answered = self._answers, self._answered
        assert answers is not None and answered is not None
        try:
            while answered.poll(0):
                reply = decode_answer(answers.recv_bytes())
                if not self._pending:
                    raise ModelProcessDown("model process answered a batch nobody sent")
                future = self._pending.popleft()
                if not future.done():
                    future.set_result(reply)
        except (EOFError, OSError, ValueError, struct.error, ModelProcessDown) as err:  # a garbled answer too
            self._stop_reading(f"model process died mid-batch ({type(err).__name__})")
            if self._proc is not None:
                self._proc.kill()

    def _stop_reading(self, why: str) -> None:
        """Drop the reader and fail every batch still waiting on the child, which is not used again."""
        self._broken = True
        if self._loop is not None and self._answers is not None and not self._answers.closed:
            self._loop.remove_reader(self._answers.fileno())
        while self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_exception(ModelProcessDown(f"{why}; it is restarted"))

    async def recall(self, rt: Runtime, jobs: Sequence[RecallJob]) -> tuple[list[Found | Rendered], BatchTimings]:
        """One batch through the child. Up to IN_FLIGHT batches may be out at once (MicroBatcher in_flight)."""
        if not self._alive():
            await self._revive()
        assert self._loop is not None and self._batches is not None
        seq = self._sent
        t0 = time.perf_counter()
        inputs = rt.profile_inputs(jobs)  # the profiles' encoding: part of the tower's time
        encoding = time.perf_counter() - t0
        msg = encode_batch(seq, rt, jobs, inputs)
        self._sent += 1
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._pending.append(future)
        try:
            # a blocking write on the event loop: a batch is a few kB and the child reads its pipe between batches
            self._batches.send_bytes(msg)
        except OSError as err:
            self._stop_reading(f"model process unreachable ({type(err).__name__})")
            raise ModelProcessDown(f"model process unreachable ({type(err).__name__}); it is restarted") from None
        reply = await future
        if reply.get("seq") != seq:  # never hand one batch's items to another: start over with a new child
            self._stop_reading("model process out of step")
            self._proc.kill()
            raise ModelProcessDown(f"model process answered batch {reply.get('seq')} for {seq}; it is restarted")
        if "error" in reply:
            raise ModelProcessDown(f"model process: {reply['error']}")
        return reply["found"], BatchTimings(encoding + reply["tower"], reply["search"])

    def _close_child(self, timeout_s: float = 5.0) -> None:
        for conn in (self._batches, self._answers, self._control):
            if conn is not None:
                conn.close()
        if self._proc is not None:
            self._proc.join(timeout_s)  # EOF on its pipes ends it
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._proc = self._batches = self._answers = self._control = None

    async def close(self) -> None:
        self._stop_reading("service shutting down")
        await asyncio.to_thread(self._close_child)
        if self._unpinned is not None:
            restore(self._unpinned)
            self._unpinned = None
