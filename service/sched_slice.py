"""QUIVER_SCHED_SLICE_US: the scheduler time slice the service's threads ask for (Linux 6.12 and later).

Linux's fair scheduler (EEVDF) lets a task that wakes up run before the one on the CPU only if its deadline, its
virtual runtime plus its slice, comes first; with the default slice (0.7 ms times 1 + log2(CPUs), 1.4 ms on two
CPUs) a woken request handler can wait out most of another task's slice. The service wakes thousands of times a
second for a few tens of microseconds each time (a request, a batch for the model process, its answer), so on a
busy machine those waits pile up into the half-load tail: on the 2-core serve-bench VM the slowest 1% came in
bursts in which the model process had waited 2-6 ms for a CPU (bench/README "serve.py"). A short slice, set with
sched_setattr's sched_runtime for a SCHED_OTHER task, lets these short bursts of work preempt long-running
neighbours as soon as they wake; the task still gets its fair share of CPU, in shorter turns.

Measured there (one server per trial, 12-15 s at a fixed rate near half load, alternating): p99 lower with 100 µs
than with the default in 6 of 7 pairs (for example 14.9 against 25.2 ms and 6.8 against 9.7 ms), throughput at
saturation unchanged within the host's noise.

Set on every thread of the calling process; threads and processes started afterwards (the model process, the
executor's thread) inherit it. The kernel clamps it to 0.1-100 ms. 0 leaves the kernel's default. Where the call does
not exist (not Linux, an unknown architecture) nothing is changed; a kernel older than 6.12 accepts the call and
ignores the value.
"""

import ctypes
import functools
import logging
import os
import platform
import struct
import sys

from service.cpus import process_threads

log = logging.getLogger("quiver.sched_slice")

MIN_US, MAX_US = 100, 100_000  # what the kernel accepts as a custom slice
# sched_setattr, sched_getattr by machine (the generic table for arm64 and riscv64)
SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275), "riscv64": (274, 275)}
# struct sched_attr, first version: size, policy, flags, nice, priority, runtime, deadline, period
ATTR = struct.Struct("IIQiIQQQ")
SCHED_OTHER = 0


def _syscalls() -> tuple[int, int] | None:
    return SYSCALLS.get(platform.machine()) if sys.platform.startswith("linux") else None


def available() -> bool:
    """Whether this platform has the sched_setattr call (it still only means something from Linux 6.12 on)."""
    return _syscalls() is not None


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _call(number: int, *args: object) -> None:
    if _libc().syscall(number, *args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def get_slice_us(tid: int = 0) -> int:
    """The slice the scheduler gives thread `tid` (0: the calling thread), in µs: the kernel's default unless set."""
    calls = _syscalls()
    if calls is None:
        raise OSError("sched_getattr needs Linux")
    buf = ctypes.create_string_buffer(ATTR.size)
    _call(calls[1], tid, buf, ATTR.size, 0)
    return ATTR.unpack(buf.raw)[5] // 1000


def set_slice_us(us: int, tid: int = 0) -> None:
    """Thread `tid`'s slice to `us` µs (0: the kernel's default), keeping its nice value."""
    calls = _syscalls()
    if calls is None:
        raise OSError("sched_setattr needs Linux")
    nice = os.getpriority(os.PRIO_PROCESS, tid)  # PRIO_PROCESS with a thread id reads that thread's nice value
    buf = ctypes.create_string_buffer(ATTR.pack(ATTR.size, SCHED_OTHER, 0, nice, 0, us * 1000, 0, 0), ATTR.size)
    _call(calls[0], tid, buf, 0)


def apply(us: int) -> int:
    """Every thread of this process onto a `us` µs slice (0: leave the default). Returns the threads changed; 0 and
    a log line where the platform has no such call or a thread refuses (a real-time or idle thread is left as is)."""
    if us == 0:
        return 0
    if not available():
        log.info("QUIVER_SCHED_SLICE_US=%d not applied: no sched_setattr on %s", us, platform.machine())
        return 0
    changed = 0
    for tid in process_threads():
        try:
            if os.sched_getscheduler(tid) == os.SCHED_OTHER:
                set_slice_us(us, tid)
                changed += 1
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
        except OSError as err:
            log.warning("QUIVER_SCHED_SLICE_US=%d: thread %d kept its slice: %s", us, tid, err)
    return changed
