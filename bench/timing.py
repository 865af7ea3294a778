"""Wall-clock samples of one small call, for the latency benchmarks (run beside them: `python bench/x.py` puts
bench/ on the import path)."""

import time
from collections.abc import Callable


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Milliseconds per call over `repeats` calls, after a few untimed ones (allocator, lazy initialisation)."""
    for _ in range(max(3, repeats // 20)):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000.0)
    return out
