"""Recall of an approximate index against exact search, measured at build time on real user vectors.

Queries are the user tower's output for a sample of the bundle's own users (every active interest of a multi-interest
model), so the number in the manifest is the recall the service will see, not the recall on item-to-item queries.
Exact neighbours are accumulated batch by batch while the index is filled, so the check needs no second pass over
the catalog and no full copy of the vectors.

Tuning: a FAISS layout has one knob whose cost grows with its value, so the cheapest swept value reaching the floor
is the fastest. ScaNN has two (leaves searched, candidates re-scored) that trade against each other, so for each
re-scoring depth the fewest leaves reaching the floor are found, and those pairs are timed (index/speed.py).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from index.backend import Searcher
from index.factory import IndexSpec, ladder
from index.options import DEFAULT_FLOOR
from index.speed import rates
from models.bundle import ModelBundle
from models.errors import QuiverError
from models.inputs import user_vectors


def query_vectors(bundle: ModelBundle, n: int = 1000, seed: int = 0, batch: int = 1024) -> np.ndarray:
    """(Q, D) float32: the active interest vectors of up to n users sampled from the bundle's user table."""
    users = bundle.users
    if users.num_rows == 0:
        raise QuiverError(f"{bundle.path / 'users.parquet'}: no users to measure recall with")
    rows = np.sort(np.random.default_rng(seed).choice(users.num_rows, size=min(n, users.num_rows), replace=False))
    out: list[np.ndarray] = []
    has_history = "history" in users.column_names
    has_times = "history_time" in users.column_names  # kept for models that read the history's timestamps
    for s in range(0, len(rows), batch):
        part = users.take(rows[s : s + batch])
        histories = part.column("history").to_pylist() if has_history else [[] for _ in range(part.num_rows)]
        times = [t or [] for t in part.column("history_time").to_pylist()] if has_times else None
        vectors, mask = user_vectors(bundle, part, [h or [] for h in histories], times=times)  # (B, K, D), (B, K)
        out.append(vectors[mask].float().cpu().numpy())  # (active, D)
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


class ExactTopK:
    """Exact top-k labels of fixed queries over a catalog streamed in batches (memory: the queries and a heap)."""

    def __init__(self, queries: np.ndarray, k: int, metric: int) -> None:
        self.queries, self.k, self.metric = queries, k, metric
        self.heap = faiss.ResultHeap(queries.shape[0], k, keep_max=metric == faiss.METRIC_INNER_PRODUCT)
        self.done = False

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """labels: (b,) int64; vectors: (b, D) float32."""
        kb = min(self.k, vectors.shape[0])
        d, i = faiss.knn(self.queries, np.ascontiguousarray(vectors, dtype=np.float32), kb, metric=self.metric)
        found = np.where(i >= 0, labels[np.clip(i, 0, None)], -1)  # (Q, kb)
        if kb < self.k:  # the heap wants (Q, k): pad with results that never win
            pad = np.full((d.shape[0], self.k - kb), -np.inf if self.heap.keep_max else np.inf, dtype=np.float32)
            d, found = np.hstack([d, pad]), np.hstack([found, np.full(pad.shape, -1)])
        self.heap.add_result(np.ascontiguousarray(d, dtype=np.float32), np.ascontiguousarray(found, dtype=np.int64))

    def result(self) -> np.ndarray:
        """(Q, k) int64 labels, -1 where the catalog had fewer than k items."""
        if not self.done:
            self.heap.finalize()
            self.done = True
        return self.heap.I


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / |exact| (both (Q, k) labels; -1 ignored)."""
    hits = total = 0
    for a, e in zip(approx, exact, strict=True):
        truth = set(e[e >= 0].tolist())
        hits += len(truth.intersection(a[a >= 0].tolist()))
        total += len(truth)
    return hits / total if total else 1.0


@dataclass
class Quality:
    k: int
    recall: float
    num_queries: int
    search: dict[str, int]  # the search parameters the recall was measured (and will be served) with
    sweep: list[dict[str, Any]] = field(default_factory=list)  # [{param: value, "recall": r}, ...]
    suggestion: dict[str, int] | None = None  # cheapest knob value that reaches the floor, if any

    def to_json(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "recall": round(self.recall, 6),
            "num_queries": self.num_queries,
            "search": self.search,
            "sweep": self.sweep,
            "suggestion": self.suggestion,
        }


def measure(
    index: Searcher,
    spec: IndexSpec,
    queries: np.ndarray,
    exact: np.ndarray,
    floor: float = DEFAULT_FLOOR,
    search: dict[str, int] | None = None,
) -> Quality:
    """Recall@k of `index` (k = exact.shape[1]) with `search` params; without them, the cheapest search parameters
    that reach `floor` (FAISS: swept knob value; ScaNN: timed pairs), else the best swept ones. A FAISS sweep stops at
    the first value reaching the floor: larger values only cost speed. ScaNN sweeps only the parameters not given."""
    k = exact.shape[1]

    def at(params: dict[str, int]) -> float:
        index.configure(params)
        _, labels = index.search(queries, k)
        return recall(labels, exact)

    given = dict(search or {})
    if spec.kind == "scann":
        sweep, suggestion = _scann_sweep(index, spec, queries, exact, floor, given)
    else:
        sweep, suggestion = _knob_sweep(spec, k, at, floor)
    if given and (spec.kind != "scann" or len(given) == len(spec.search_params)):
        chosen = given
    elif suggestion is not None:
        chosen = dict(suggestion)
    elif sweep:
        best = max(sweep, key=lambda s: s["recall"])
        chosen = {name: int(best[name]) for name in spec.search_params}
    else:
        chosen = {}
    value = at(chosen)
    return Quality(k, value, int(queries.shape[0]), chosen, sweep, suggestion)


def _fewest(values: list[int], probe: Callable[[int], float], floor: float, give_up: Callable[[], bool]) -> int | None:
    """The smallest value reaching the floor, recall growing with the value: the first of `values` (increasing,
    ~1.4x apart) that reaches it, then the gap down to the last value that missed halved until it is within 1/16,
    since a knob 40% too high costs up to 40% of the speed. None if none reaches it or `give_up()` after a miss."""
    missed = None
    for value in values:
        if probe(value) >= floor:
            while missed is not None and value - missed > max(1, missed // 16):
                mid = (missed + value) // 2
                if probe(mid) >= floor:
                    value = mid
                else:
                    missed = mid
            return value
        missed = value
        if give_up():
            return None
    return None


def _knob_sweep(
    spec: IndexSpec, k: int, at: Callable[[dict[str, int]], float], floor: float
) -> tuple[list[dict[str, Any]], dict[str, int] | None]:
    sweep: list[dict[str, Any]] = []
    for name in spec.search_params:  # FAISS layouts have at most one

        def probe(value: int, name: str = name) -> float:
            r = at({name: value})
            sweep.append({name: value, "recall": round(r, 6)})
            return r

        found = _fewest(spec.sweep(k), probe, floor, lambda: False)
        if found is not None:
            return sweep, {name: found}
    return sweep, None


def _scann_sweep(
    index: Searcher, spec: IndexSpec, queries: np.ndarray, exact: np.ndarray, floor: float, given: dict[str, int]
) -> tuple[list[dict[str, Any]], dict[str, int] | None]:
    """For each re-scoring depth (2k .. 16k candidates, deepest first), the fewest leaves reaching the floor: a
    shallower depth needs at least the leaves a deeper one needed, so each scan starts where the last one stopped,
    and it gives up once a search costs more than the cheapest pair found (more leaves only cost more). The pairs
    found are then timed one query at a time; the fastest is the suggestion."""
    k, n = exact.shape[1], index.ntotal
    leaves = [given["leaves_to_search"]] if "leaves_to_search" in given else ladder(int(spec.params["leaves"]))
    depths = [given["reorder"]] if "reorder" in given else sorted({min(n, m * k) for m in (2, 4, 8, 16)}, reverse=True)
    sweep: list[dict[str, Any]] = []
    cost: dict[tuple[int, int], float] = {}  # (leaves, depth) -> seconds per query of the batched sweep search
    reached: list[dict[str, int]] = []
    last: list[float] = [0.0]

    def probe_at(depth: int) -> Callable[[int], float]:
        def probe(searched: int) -> float:
            params = {"leaves_to_search": searched, "reorder": depth}
            index.configure(params)
            t0 = time.perf_counter()
            _, labels = index.search(queries, k)
            last[0] = cost[searched, depth] = (time.perf_counter() - t0) / len(queries)
            r = recall(labels, exact)
            sweep.append({**params, "recall": round(r, 6)})
            return r

        return probe

    start = leaves[0]
    for depth in depths:
        cheapest = min((cost[p["leaves_to_search"], p["reorder"]] for p in reached), default=np.inf)
        values = [start, *(v for v in leaves if v > start)]
        found = _fewest(values, probe_at(depth), floor, lambda cheapest=cheapest: last[0] > cheapest)
        if found is not None:
            reached.append({"leaves_to_search": found, "reorder": depth})
            start = found
    if not reached:
        return sweep, None
    qps = rates([(index, params) for params in reached], queries, k)
    for params, rate in zip(reached, qps, strict=True):
        for point in sweep:
            if all(point[name] == value for name, value in params.items()):
                point["qps_single"] = round(rate, 1)
    return sweep, reached[int(np.argmax(qps))]


def check_floor(quality: Quality, floor: float, allow_low: bool, factory: str) -> None:
    """Refuse a build below the floor, naming the parameter that would reach it when the sweep found one."""
    if quality.recall >= floor or allow_low:
        return
    flag = {"nprobe": "--nprobe", "efSearch": "--ef-search", "leaves_to_search": "--leaves-to-search"}
    at = ", ".join(f"{k}={v}" for k, v in quality.search.items()) or "exact"
    if quality.suggestion:
        use = " ".join(f"{flag.get(name, '--' + name)} {value}" for name, value in quality.suggestion.items())
        hint = f"use {use} (reaches the floor)"
    else:
        hint = "no swept search parameter reaches it: use a finer index, or --allow-low-recall"
    raise QuiverError(
        f"index {factory!r}: recall@{quality.k} {quality.recall:.4f} ({at}) is below the floor {floor}; {hint}"
    )
