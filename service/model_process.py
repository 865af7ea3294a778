"""The model process (QUIVER_MODEL_PROCESS): /recall's user tower and index search in a process of their own, fed
the micro-batches over a pipe.

In one process the event loop (HTTP parsing, validation, user state, the JSON answer) and the model thread (the
tower's feature encoding, the search's bookkeeping) take turns on one GIL: the server answered at 0.45x the rate
of the same pipeline called directly, with one core busy and the other mostly idle (bench/README "serve.py"). Here
the HTTP process keeps everything else (user state, unknown-id reports, filters' validation, the ranker, /rank,
/events) and its model thread only encodes a batch, waits on the pipe with the GIL released, and decodes the answer;
the child runs `Runtime.recall` on the same triple, loaded from the same folders.

Messages are JSON (orjson) over two `multiprocessing` connections, never pickled data:

    control (reloads, one at a time):  {"op": "load", "model": dir, "index": dir, "versions": [m, i, r]}
                                       -> {"ok": true} | {"error": "..."}
    work (the model thread only):      {"seq": n, "versions": [m, i, r], "jobs": [job, ...]}
                                       -> {"seq": n, "found": [[ids, scores, interests], ...], "tower": s,
                                           "search": s} | {"seq": n, "error": "..."}

The child keeps the two newest triples (a request that began on the previous one finishes on it; a batch is
split by runtime before it gets here). It loads on a thread of its own, so a reload does not stop the batches.
If the child dies, the batch in flight fails (503, `ModelProcessDown`) and the next one starts a new child and
loads the triples the old one held before it goes on.
"""

import logging
import multiprocessing as mp
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import orjson

from index.filter import Filter
from models.errors import QuiverError
from service.runtime import BatchTimings, Found, RecallJob, Runtime, Target
from service.userstate import UserState

log = logging.getLogger("quiver.model_process")

IN_FLIGHT = 2  # batches sent to the child at once (MicroBatcher in_flight)
KEEP = 2  # triples the child holds: the served one and the one in-flight requests may still be on
Versions = tuple[str, str, str | None]


class ModelProcessDown(QuiverError):
    """The model process died or refused a batch; the requests of that batch get a 503."""


# ---------------------------------------------------------------- the wire format


def encode_job(job: RecallJob) -> list[Any]:
    s = job.state
    clauses = job.filter.clauses if job.filter is not None else None
    return [s.user_id, s.profile, s.history, s.history_time, s.known, job.fetch, job.exclude, clauses]


def _tuples(value: Any) -> Any:
    """JSON turned the filter's tuples into lists; its clauses are compared and hashed as tuples."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def decode_job(row: list[Any]) -> RecallJob:
    user_id, profile, history, history_time, known, fetch, exclude, clauses = row
    state = UserState(user_id, profile, history, "", known, [], history_time)
    flt = Filter(_tuples(clauses)) if clauses is not None else None
    return RecallJob(state, fetch, exclude, flt)


# ---------------------------------------------------------------- the child


def _child_main(work: Connection, control: Connection, threads: int) -> None:
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
                versions: Versions = tuple(msg["versions"])  # type: ignore[assignment]
                if versions not in held:
                    target = Target(msg["model"], msg["index"], None, versions)  # the ranker stays in the HTTP process
                    rt = load_runtime(target)
                    with lock:
                        held[versions] = rt
                        for old in list(held)[:-KEEP]:
                            del held[old]
                    settle_heap()
                reply: dict[str, Any] = {"ok": True}
            except Exception as err:  # reported to the reload, which refuses the triple
                reply = {"error": f"{type(err).__name__}: {err}"[:1000]}
            control.send_bytes(orjson.dumps(reply))

    threading.Thread(target=loader, name="quiver-model-loader", daemon=True).start()
    while True:
        try:
            msg = orjson.loads(work.recv_bytes())
        except EOFError:  # the HTTP process closed the pipe or died: nothing left to serve
            return
        seq = msg.get("seq")
        rt = held.get(tuple(msg["versions"]))  # type: ignore[arg-type]
        if rt is None:
            work.send_bytes(orjson.dumps({"seq": seq, "error": f"triple {msg['versions']} is not loaded"}))
            continue
        try:
            found, timings = rt.recall([decode_job(j) for j in msg["jobs"]])
            out = {
                "seq": seq,
                "found": [tuple(f) for f in found],
                "tower": timings.user_tower,
                "search": timings.search,
            }
        except Exception as err:
            out = {"seq": seq, "error": f"{type(err).__name__}: {err}"[:1000]}
        work.send_bytes(orjson.dumps(out))


# ---------------------------------------------------------------- the HTTP process's handle


class ModelProcess:
    """The HTTP process's end: `load` from the reload path, `recall` from the model thread (one caller each)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._ctx = mp.get_context("spawn")  # a fresh interpreter: no fork of a process holding threads and locks
        self._control_lock = threading.Lock()  # one load or restart at a time
        # Up to IN_FLIGHT batches are sent before the first answer is back; the child answers in order, so each
        # caller takes a ticket when it sends and reads the answer when its turn comes.
        self._send_lock = threading.Lock()
        self._turn = threading.Condition()
        self._sent = self._answered = 0
        self._generation = 0  # which child the tickets belong to
        self._targets: dict[Versions, Target] = {}  # what the child holds, to load again into a restarted one
        self._proc: Any = None
        self._work: Connection | None = None
        self._control: Connection | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        work, work_child = self._ctx.Pipe()
        control, control_child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_child_main, args=(work_child, control_child, self.threads), name="quiver-model", daemon=True
        )
        proc.start()
        work_child.close()
        control_child.close()
        self._proc, self._work, self._control = proc, work, control
        log.info("model process started (pid %s)", proc.pid)

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def _ask(self, target: Target) -> None:
        assert self._control is not None
        msg = {"op": "load", "model": str(target.model), "index": str(target.index), "versions": target.versions}
        self._control.send_bytes(orjson.dumps(msg))
        reply = orjson.loads(self._control.recv_bytes())
        if "error" in reply:
            raise QuiverError(f"model process: {reply['error']}")

    def load(self, target: Target) -> None:
        """Load a triple in the child (blocking; the batches go on meanwhile). Raises if the child refuses it."""
        with self._send_lock, self._control_lock, self._turn:  # the lock order of `recall`'s restart
            if not self._alive():
                self._restart()
        with self._control_lock:
            try:
                self._ask(target)
            except (EOFError, OSError) as err:
                raise QuiverError(f"model process died while loading ({type(err).__name__})") from None
            self._targets[target.versions] = target
            for old in list(self._targets)[:-KEEP]:
                del self._targets[old]

    def _restart(self) -> None:
        """A new child holding what the old one held. Called holding the send, control and turn locks: batches
        still waiting for an answer of the old child are woken and told so."""
        self.close()
        self._generation += 1
        self._sent = self._answered = 0
        self._turn.notify_all()
        self._start()
        for target in self._targets.values():
            self._ask(target)

    def recall(self, rt: Runtime, jobs: Sequence[RecallJob]) -> tuple[list[Found], BatchTimings]:
        """One batch through the child (blocking, GIL released while it waits); thread-safe for IN_FLIGHT callers."""
        encoded = [encode_job(j) for j in jobs]
        with self._send_lock:
            if not self._alive():
                with self._control_lock, self._turn:
                    log.warning("model process gone: starting a new one")
                    self._restart()
            assert self._work is not None
            work, generation, ticket = self._work, self._generation, self._sent
            self._sent += 1
            try:
                work.send_bytes(orjson.dumps({"seq": ticket, "versions": rt.versions, "jobs": encoded}))
            except OSError as err:
                raise ModelProcessDown(f"model process unreachable ({type(err).__name__}); it is restarted") from None
        with self._turn:
            self._turn.wait_for(lambda: self._answered == ticket or self._generation != generation)
            if self._generation != generation:
                raise ModelProcessDown("model process restarted while this batch waited; it was not answered")
            try:
                reply = orjson.loads(work.recv_bytes())
            except (EOFError, OSError) as err:
                why = type(err).__name__
                raise ModelProcessDown(f"model process died mid-batch ({why}); it is restarted") from None
            finally:
                self._answered += 1
                self._turn.notify_all()
        if reply.get("seq") != ticket:  # never hand one batch's items to another: start over with a new child
            self._proc.kill()
            self._proc.join(5)
            raise ModelProcessDown(f"model process answered batch {reply.get('seq')} for {ticket}; it is restarted")
        if "error" in reply:
            raise ModelProcessDown(f"model process: {reply['error']}")
        return [Found(*f) for f in reply["found"]], BatchTimings(reply["tower"], reply["search"])

    def close(self, timeout_s: float = 5.0) -> None:
        for conn in (self._work, self._control):
            if conn is not None:
                conn.close()
        if self._proc is not None:
            self._proc.join(timeout_s)  # EOF on its pipes ends it
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._proc = self._work = self._control = None
