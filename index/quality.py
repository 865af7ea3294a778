"""Recall of an approximate index against exact search, measured at build time on real user vectors.

Queries are the user tower's output for a sample of the bundle's own users (every active interest of a multi-interest
model), so the number in the manifest is the recall the service will see, not the recall on item-to-item queries.
Exact neighbours are accumulated batch by batch while the index is filled, so the check needs no second pass over
the catalog and no full copy of the vectors.
"""

from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from index.factory import IndexSpec, set_search_params
from index.options import DEFAULT_FLOOR
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
    index: faiss.Index,
    spec: IndexSpec,
    queries: np.ndarray,
    exact: np.ndarray,
    floor: float = DEFAULT_FLOOR,
    search: dict[str, int] | None = None,
) -> Quality:
    """Recall@k of `index` (k = exact.shape[1]) with `search` params; without them, the cheapest swept value of the
    index's knob (nprobe / efSearch) that reaches `floor`, else the best one. The sweep stops at the first value
    reaching the floor: larger values only cost speed."""
    k = exact.shape[1]

    def at(params: dict[str, int]) -> float:
        set_search_params(index, params)
        _, labels = index.search(queries, k)
        return recall(labels, exact)

    sweep: list[dict[str, Any]] = []
    suggestion: dict[str, int] | None = None
    knob = spec.search_param
    if knob is not None:
        for value in spec.sweep(k):
            r = at({knob: value})
            sweep.append({knob: value, "recall": round(r, 6)})
            if r >= floor:
                suggestion = {knob: value}
                break
    if search:
        chosen = dict(search)
    elif suggestion is not None:
        chosen = dict(suggestion)
    elif sweep:
        best = max(sweep, key=lambda s: s["recall"])
        chosen = {knob: int(best[knob])} if knob else {}
    else:
        chosen = {}
    value = at(chosen)
    return Quality(k, value, int(queries.shape[0]), chosen, sweep, suggestion)


def check_floor(quality: Quality, floor: float, allow_low: bool, factory: str) -> None:
    """Refuse a build below the floor, naming the parameter that would reach it when the sweep found one."""
    if quality.recall >= floor or allow_low:
        return
    flag = {"nprobe": "--nprobe", "efSearch": "--ef-search"}
    at = ", ".join(f"{k}={v}" for k, v in quality.search.items()) or "exact"
    if quality.suggestion:
        ((name, value),) = quality.suggestion.items()
        hint = f"use {flag[name]} {value} (reaches the floor)"
    else:
        hint = "no swept search parameter reaches it: use a finer index, or --allow-low-recall"
    raise QuiverError(
        f"index {factory!r}: recall@{quality.k} {quality.recall:.4f} ({at}) is below the floor {floor}; {hint}"
    )
