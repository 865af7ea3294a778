"""Micro-batching: concurrent requests share one user-tower pass and one index search.

Per request, a tower forward and a FAISS search cost mostly fixed overhead (Python, dispatch, one graph walk start);
batched, that overhead is paid once per batch. A single collector task takes the first waiting request, then
whatever else is queued, waiting up to `max_wait_s` for more while the batch is smaller than `max_size`, and hands
the batch to the model thread. While the model thread works, new requests queue up, so under load batches fill by
themselves and `max_wait_s` only matters when traffic is light.

Requests carry the runtime they started on; a batch that straddles a hot swap is split by runtime, so a request is
answered entirely by the version it began with.
"""

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")
Owner = TypeVar("Owner")


@dataclass
class _Pending(Generic[Owner, Job, Result]):
    owner: Owner
    job: Job
    future: asyncio.Future[Result]
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[Owner, Job, Result]):
    """`await submit(owner, job)` -> that job's result from `run(owner, jobs)` on `executor`."""

    def __init__(
        self,
        run: Callable[[Owner, Sequence[Job]], Sequence[Result] | Awaitable[Sequence[Result]]],
        executor: Executor,
        max_size: int,
        max_wait_s: float,
        on_batch: Callable[[int], None] | None = None,
        in_flight: int = 1,
    ) -> None:
        """run: computes a batch on `executor` (the model thread), or, a coroutine function, hands it elsewhere and
        awaits the answer (a model process). in_flight: batches handed over at once; one for the model thread, three
        for a model process, so that the next batch already waits there while the last one's answers travel back
        (service/model_process.py)."""
        self.run = run
        self._is_async = inspect.iscoroutinefunction(run)
        self.executor = executor
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Pending[Owner, Job, Result]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(in_flight)
        self._running: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._collect(), name="quiver-microbatcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._running:  # batches already handed over finish and answer their requests
            await asyncio.gather(*self._running, return_exceptions=True)
        while not self._queue.empty():
            p = self._queue.get_nowait()
            if not p.future.done():
                p.future.set_exception(RuntimeError("service shutting down"))

    async def submit(self, owner: Owner, job: Job) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(owner, job, future))
        return await future

    async def _gather(self) -> list[_Pending[Owner, Job, Result]]:
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _collect(self) -> None:
        while True:
            await self._slots.acquire()  # a batch is gathered only once it can be handed over at once
            try:
                batch = [p for p in await self._gather() if not p.future.cancelled()]
            except BaseException:
                self._slots.release()
                raise
            groups: dict[int, list[_Pending[Owner, Job, Result]]] = {}
            for p in batch:
                groups.setdefault(id(p.owner), []).append(p)
            task = asyncio.get_running_loop().create_task(self._run(list(groups.values())))
            self._running.add(task)  # held until done: the loop keeps only weak references to tasks
            task.add_done_callback(self._running.discard)

    async def _run(self, groups: list[list[_Pending[Owner, Job, Result]]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            for group in groups:
                if self.on_batch is not None:
                    self.on_batch(len(group))
                try:
                    jobs = [p.job for p in group]
                    if self._is_async:  # it hands the batch over itself (a model process) and awaits the answer
                        results = await self.run(group[0].owner, jobs)  # type: ignore[misc]
                    else:
                        results = await loop.run_in_executor(self.executor, self.run, group[0].owner, jobs)
                except Exception as err:  # one bad batch fails its own requests, never the collector
                    for p in group:
                        if not p.future.done():
                            p.future.set_exception(err)
                    continue
                for p, r in zip(group, results, strict=True):
                    if not p.future.done():
                        p.future.set_result(r)
        finally:
            self._slots.release()
