"""`--index auto`: build the layouts that suit the catalog's size, tune each to the recall floor on the catalog's own
vectors, time each one query at a time, and keep the fastest that reaches the floor, unless exact search is fast
enough.

Exact search is kept whenever its measured cost is at most EXACT_ENOUGH_S a query: it loses no recall, has nothing to
tune and upserts in place, and at that cost (a few percent of a ~1 ms request) a faster approximate index saves
nothing that matters. Plain "fastest" would never keep it: FAISS's per-call overhead makes a 1,000-item exact scan
(~25 µs) slower than a ScaNN tree searched almost whole (~13 µs).

Which layouts suit a size: below EXACT_BELOW items only Flat (a few dozen microseconds a query, nothing to tune); up
to EXACT_MAX items Flat is timed beside the others. From EXACT_BELOW on, ScaNN (where the package exists), FAISS
IVF-SQ8 and, up to HNSW_MAX items, FAISS HNSW32. An HNSW graph's build grows faster than linearly: on
bench/index.py's 1M clustered vectors it took 231 s on 2 cores against 32 s for ScaNN and 13 s for IVF-SQ8, and
answered at 0.6x ScaNN's single-query rate at the floor, so beyond that size it would multiply the build time for a
rival that loses. Every candidate's figures go into the manifest (`auto`), the winner's and the losers', so the
choice can be checked.
"""

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from index.backend import Searcher, build_searcher
from index.factory import AUTO, SCANN, IndexSpec, parse_spec, scann_spec
from index.quality import Quality, measure
from index.scann_backend import available as scann_available
from index.speed import rates
from models.errors import QuiverError

EXACT_BELOW = 20_000
EXACT_MAX = 100_000
EXACT_ENOUGH_S = 50e-6
HNSW_MAX = 300_000
HNSW_M = 32


def ivf_lists(n: int) -> int:
    """~4 sqrt(n) lists, a power of two (4,096 at 1M items), at most one per 39 items (k-means' minimum)."""
    target = max(1, min(4 * n**0.5, n / 39))
    return 1 << max(0, round(np.log2(target)))


def candidates(
    n: int, dim: int | None, ef_construction: int | None = None
) -> tuple[list[IndexSpec], list[dict[str, str]]]:
    """The layouts worth building for n items, and the ones left out with the reason (recorded in the manifest)."""
    exact = [parse_spec("Flat", dim)] if n <= EXACT_MAX else []
    if n < EXACT_BELOW:
        return exact, []
    specs, skipped = list(exact), []
    if scann_available():
        specs.append(scann_spec(n, dim))
    else:
        skipped.append({"factory": "ScaNN", "reason": "the scann package is not installed (Linux x86-64 only)"})
    hnsw = f"HNSW{HNSW_M},Flat"
    if n <= HNSW_MAX:
        specs.append(parse_spec(hnsw, dim, ef_construction))
    else:
        skipped.append({"factory": hnsw, "reason": f"more than {HNSW_MAX} items: its graph takes ~7x ScaNN's build"})
    specs.append(parse_spec(f"IVF{ivf_lists(n)},SQ8", dim))
    return specs, skipped


def layouts(
    request: str, n: int | None, dim: int | None, ef_construction: int | None = None
) -> tuple[list[IndexSpec], list[dict[str, str]]] | None:
    """What an `--index` request means for a catalog of n items: `auto` its candidates (and the layouts left out),
    `scann` the tree sized for it, a layout itself. None while n is unknown and the answer depends on it."""
    word = request.strip().lower()
    if word == SCANN and ef_construction is not None:
        raise QuiverError(f"index {request!r}: efConstruction is an HNSW build parameter, this layout has none")
    if word in (AUTO, SCANN):
        if n is None:
            return None
        return candidates(n, dim, ef_construction) if word == AUTO else ([scann_spec(n, dim)], [])
    return [parse_spec(request, dim, ef_construction)], []


@dataclass
class Trial:
    spec: IndexSpec
    index: Searcher | None  # dropped once it lost
    quality: Quality
    build_s: float
    on_gpu: bool
    qps_single: float = 0.0

    def to_json(self, chosen: bool) -> dict[str, Any]:
        return {
            "factory": self.spec.factory,
            "backend": self.spec.backend,
            "params": self.spec.params,
            "search": self.quality.search,
            "recall": round(self.quality.recall, 6),
            "qps_single": round(self.qps_single, 1),
            "build_s": round(self.build_s, 3),
            "chosen": chosen,
        }


def choose(
    specs: list[IndexSpec],
    vectors: np.ndarray,
    metric: int,
    queries: np.ndarray,
    exact: np.ndarray,
    floor: float,
    gpu: bool | None = None,
    seed: int = 0,
) -> tuple[Trial, list[Trial]]:
    """Build every spec over (N, D) `vectors` (labels = rows), tune it to `floor` against `exact` (Q, k) labels of
    `queries` (Q, D), and time the ones that reach it together. Returns the winner (exact search if it costs at
    most EXACT_ENOUGH_S a query, else the fastest of those, else the one of best recall) and every trial, in
    `specs` order."""
    if not specs:
        raise QuiverError("no index layout to choose from")
    trials: list[Trial] = []
    for spec in specs:
        started = time.perf_counter()
        index, on_gpu = build_searcher(spec, vectors, metric, gpu=gpu, seed=seed)
        build_s = time.perf_counter() - started
        trials.append(Trial(spec, index, measure(index, spec, queries, exact, floor), build_s, on_gpu))
    contenders = [t for t in trials if t.quality.recall >= floor]
    if contenders:
        k = exact.shape[1]
        timed = rates([(t.index, t.quality.search) for t in contenders if t.index is not None], queries, k)
        for trial, rate in zip(contenders, timed, strict=True):
            trial.qps_single = rate
        fast_exact = [t for t in contenders if t.spec.kind == "flat" and t.qps_single * EXACT_ENOUGH_S >= 1]
        winner = fast_exact[0] if fast_exact else max(contenders, key=lambda t: t.qps_single)
    else:  # nobody reaches the floor: the closest, which the floor check then refuses (or publishes when allowed)
        winner = max(trials, key=lambda t: t.quality.recall)
    for trial in trials:
        if trial is not winner:
            trial.index = None
    assert winner.index is not None
    winner.index.configure(winner.quality.search)  # timing left it on the last parameters timed
    return winner, trials
