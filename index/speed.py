"""Queries per second of a searcher, one query per call on one thread: the cost of the online path, measured the
way bench/index.py measures it, so that what a build picks and what the benchmark reports agree.

One thread, because a single FAISS query gains nothing from OpenMP (a 2-thread Flat search is 2.4x slower than a
1-thread one on a 2-core machine) and ScaNN answers a single query on the calling thread anyway. Rivals are timed in
interleaved rounds and each keeps its best round, so a burst of load from a neighbour on a shared machine slows one
round of every rival rather than every round of one.
"""

import contextlib
import time
from collections.abc import Iterator, Sequence

import faiss
import numpy as np

from index.backend import Searcher

ROUNDS = 3
ROUND_QUERIES = 200  # queries timed per rival and round, at most ...
ROUND_SECONDS = 0.5  # ... and for at most this long (at least 5 queries)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def single_rate(searcher: Searcher, queries: np.ndarray, k: int) -> float:
    """Queries/s over up to ROUND_QUERIES of `queries` (Q, D), one search call each, with the current parameters."""
    searcher.search(queries[:1], k)  # warm-up: first-touch pages, lazily built tables
    done, start = 0, time.perf_counter()
    limit = min(ROUND_QUERIES, len(queries))
    while done < limit and (done < 5 or time.perf_counter() - start < ROUND_SECONDS):
        searcher.search(queries[done : done + 1], k)
        done += 1
    return done / (time.perf_counter() - start)


def rates(rivals: Sequence[tuple[Searcher, dict[str, int]]], queries: np.ndarray, k: int) -> list[float]:
    """Best single-query rate of each (searcher, search parameters) over ROUNDS interleaved rounds, one thread. A
    searcher may appear with several parameter sets; it is left configured with the last one."""
    best = [0.0] * len(rivals)
    with one_thread():
        for _ in range(ROUNDS):
            for i, (searcher, params) in enumerate(rivals):
                searcher.configure(params)
                best[i] = max(best[i], single_rate(searcher, queries, k))
    return best
