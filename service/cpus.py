"""QUIVER_MODEL_CPUS: which CPUs the model process (QUIVER_MODEL_PROCESS) and the HTTP process may run on.

Left free, the scheduler may queue two busy processes that feed each other over a pipe on one CPU: on the 2-core
serve-bench VM the half-load p99 came in 10-15 ms bursts in which the child first waited 2-6 ms for a CPU and then
computed its batches 2-3x slower (bench/README "serve.py"). Pinned apart, neither can be queued behind the other.
Measured there: short runs went over 10 ms in 1 of 13 tries pinned against 5 of 13 free, but two full bench runs did
not show a gain, so this is off by default. On a shared host, or in a container whose CPU quota is smaller than its
CPU set, fixed CPUs can be the busy ones.

    ""        no pinning (the default)
    "auto"    the model process gets the last QUIVER_TORCH_THREADS CPUs this process may use, the HTTP process the rest;
              nothing is pinned with fewer than two CPUs or with several workers (their children would share CPUs)
    "3", "2-3,6"   these CPUs for the model process, the rest for the HTTP process (with workers, every worker's
              child gets the same ones)

Linux only (sched_setaffinity); elsewhere anything but "" is refused at start.
"""

import os
from typing import NamedTuple

from models.errors import QuiverError

AUTO = "auto"


class CpuPlan(NamedTuple):
    model: frozenset[int]  # the model process's CPUs
    http: frozenset[int] | None  # the HTTP process's; None: left as they are (the model has every CPU)


def parse_cpus(text: str) -> frozenset[int] | str | None:
    """'' -> None, 'auto' -> 'auto', '1,3-4' -> {1, 3, 4}; ValueError with the offending part otherwise."""
    text = text.strip()
    if not text:
        return None
    if text == AUTO:
        return AUTO
    cpus: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not a CPU number or range (e.g. '3' or '2-3,6')") from None
        if first < 0 or last < first:
            raise ValueError(f"{part.strip()!r}: CPU ranges run from a number >= 0 up")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def plan(spec: str, threads: int, workers: int) -> CpuPlan | None:
    """The pinning QUIVER_MODEL_CPUS asks for on this machine, or None for none. Raises QuiverError for CPUs this
    process may not use or a platform without sched_setaffinity."""
    wanted = parse_cpus(spec)
    if wanted is None:
        return None
    if not hasattr(os, "sched_setaffinity"):
        raise QuiverError("QUIVER_MODEL_CPUS: pinning needs Linux (sched_setaffinity); leave it empty here")
    allowed = frozenset(os.sched_getaffinity(0))
    if wanted == AUTO:
        if len(allowed) < 2 or workers > 1:
            return None
        ordered = sorted(allowed)
        model = frozenset(ordered[-min(threads, len(ordered) - 1) :])
    else:
        assert isinstance(wanted, frozenset)
        missing = sorted(wanted - allowed)
        if missing:
            raise QuiverError(f"QUIVER_MODEL_CPUS: CPUs {missing} are not among this process's {sorted(allowed)}")
        model = wanted
    rest = allowed - model
    return CpuPlan(model, rest or None)


def pin_process(cpus: frozenset[int]) -> dict[int, set[int]]:
    """Every thread of this process onto `cpus` (sched_setaffinity(0) would move only the calling one); returns each
    thread's previous CPUs, for `restore`."""
    before: dict[int, set[int]] = {}
    for tid in process_threads():
        try:
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile
            continue
    return before


def restore(before: dict[int, set[int]]) -> None:
    """Threads pinned by `pin_process` back to their CPUs; threads started since get the main thread's."""
    fallback = before.get(os.getpid())
    for tid in process_threads():
        cpus = before.get(tid, fallback)
        if cpus:
            try:
                os.sched_setaffinity(tid, cpus)
            except (ProcessLookupError, PermissionError):
                continue


def process_threads() -> list[int]:
    """Ids of this process's threads now (Linux): what a per-thread scheduler call has to visit."""
    return [int(t) for t in os.listdir("/proc/self/task")]
