"""Filtered retrieval at 1M items: recall@100 against exact filtered search and queries/s at four selectivities,
beside the unfiltered rate and a client-side over-fetch-and-filter baseline, on the same index in the same run
(DESIGN §8, issue #17).

Data: bench/index.py's vectors (1M L2-normalised 64-d points of a power-law Gaussian mixture, queries held out), and
a `category` column of 1,000 values drawn uniformly, independent of the vectors (the usual random-filter setting:
a filter does not line up with the index's clusters). Filters: any of the first 500, 100, 10 and 1 categories, which
pass 50%, 10%, 1% and 0.1% of the catalog.

Index: what Quiver serves at this size, `--index auto` (index/auto.py: each candidate tuned to recall@100 >= 0.95 on
held-out tuning queries, the fastest kept; at 1M on this machine that is ScaNN, which has no ID selector, so the
filter runs by exact scoring of the passing items or by over-fetch), and, as a second row, FAISS IVF-SQ8 tuned to
the same floor, where the filter runs inside the search through an `IDSelectorBitmap`.

Per selectivity and index, one query per call on one thread:
- quiver: `index.filter.Attributes.passing` + `index.search.search_vectors(..., passing)`, the path /recall takes;
  the filter's first use (mask, labels, gathered vectors) is timed apart as `first_ms`, later calls hit its cache;
- overfetch: what a client does without filters in the service: ask the unfiltered index for k / selectivity x 1.25
  items, drop those failing the filter, and ask again for twice as many while fewer than k are left;
- exact filtered search (faiss.knn over the passing vectors) is the truth for both recalls.
Rates are the best of 3 interleaved rounds. Goal: recall@100 >= 0.95 at every selectivity, and the auto pick's
quiver rate >= 3x the over-fetch baseline's at 1%.

    flock /tmp/quiver-cpu.lock .venv/bin/python bench/filters.py [--items 1000000] [--queries 300]
    .venv/bin/python bench/filters.py --items 50000 --queries 100      # quick run

Prints one JSON line; writes bench.json and filters.png into --out. Exit 2 when something it needs is missing.
"""

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.auto import candidates, choose
from index.backend import Searcher
from index.filter import Attributes, Passing
from index.search import search_vectors

K = 100
FLOOR = 0.95
GOAL_SPEEDUP = 3.0
CATEGORIES = 1000
SELECTIVITIES = {"50%": 500, "10%": 100, "1%": 10, "0.1%": 1}  # name -> categories in the any-of list
OVERFETCH_MARGIN = 1.25


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--centres", type=int, default=2000)
    p.add_argument("--spread", type=float, default=0.6)
    p.add_argument("--queries", type=int, default=300, help="held-out queries per measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--build-threads", type=int, default=2)
    p.add_argument("--no-faiss-row", action="store_true", help="measure the auto pick only")
    p.add_argument("--out", default="artifacts/bench/filters")
    return p.parse_args(argv)


def mixture_fn() -> Callable[..., np.ndarray]:
    """bench/index.py's catalog generator (that file cannot be imported by name: `index` is Quiver's package)."""
    spec = importlib.util.spec_from_file_location("bench_index", Path(__file__).with_name("index.py"))
    if spec is None or spec.loader is None:
        raise SystemExit("bench/filters.py: bench/index.py, which generates the vectors, is missing")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.mixture


def tuned(spec: Any, x: np.ndarray, tuning: np.ndarray, tuning_exact: np.ndarray) -> Searcher:
    winner, _ = choose([spec], x, faiss.METRIC_INNER_PRODUCT, tuning, tuning_exact, FLOOR)
    assert winner.index is not None
    return winner.index


def quiver_search(index: Searcher, passing: Passing, q: np.ndarray) -> np.ndarray:
    return search_vectors(index, q, None, K, None, passing)[0][0]


def overfetch_search(index: Searcher, passing: Passing, q: np.ndarray) -> np.ndarray:
    """The client's loop: unfiltered top-`width`, keep the passing, widen while short (until the catalog ends)."""
    n = index.ntotal
    want = min(K, passing.count)
    width = min(n, int(np.ceil(K * OVERFETCH_MARGIN * n / max(passing.count, 1))))
    while True:
        labels = search_vectors(index, q, None, width)[0][0]
        kept = labels[passing.mask[labels]][:K]
        if kept.size >= want or width >= n:
            return kept
        width = min(n, 2 * width)


def rate(fn: Callable[[np.ndarray], np.ndarray], queries: np.ndarray) -> tuple[float, list[np.ndarray]]:
    found, start = [], time.perf_counter()
    for q in queries:
        found.append(fn(q[None]))
    return len(queries) / (time.perf_counter() - start), found


def recall(found: list[np.ndarray], truth: list[np.ndarray]) -> float:
    return float(np.mean([np.intersect1d(f, t).size / max(1, t.size) for f, t in zip(found, truth, strict=True)]))


def measure_index(
    name: str, index: Searcher, attrs: Attributes, x: np.ndarray, queries: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    faiss.omp_set_num_threads(1)
    out: dict[str, Any] = {"index": name, "selectivity": {}}
    unfiltered = max(rate(lambda q: search_vectors(index, q, None, K)[0][0], queries)[0] for _ in range(args.rounds))
    out["unfiltered_qps"] = round(unfiltered, 1)
    for sel, m in tqdm(SELECTIVITIES.items(), desc=f"{name}: selectivities", leave=False):
        flt = attrs.parse({"category": [f"c{c:03d}" for c in range(m)]})
        t0 = time.perf_counter()
        passing = attrs.passing(flt, index, x.shape[1])
        quiver_search(index, passing, queries[:1])  # the filter's first use: mask, labels, gathered vectors
        first_ms = (time.perf_counter() - t0) * 1e3
        _, truth_idx = faiss.knn(queries, x[passing.labels], min(K, passing.count), metric=faiss.METRIC_INNER_PRODUCT)
        truth = [passing.labels[row] for row in truth_idx]
        best = {"quiver": 0.0, "overfetch": 0.0}
        found: dict[str, list[np.ndarray]] = {}
        for _ in range(args.rounds):  # interleaved: both sides see the same machine load
            for side, fn in (("quiver", quiver_search), ("overfetch", overfetch_search)):
                qps, got = rate(lambda q, fn=fn, p=passing: fn(index, p, q), queries)
                best[side] = max(best[side], qps)
                found[side] = got
        exact_k = all(f.size == min(K, passing.count) and passing.mask[f].all() for f in found["quiver"])
        out["selectivity"][sel] = {
            "passing": passing.count,
            "path": "exact" if passing.exact else ("selector" if index.selects else "overfetch"),
            "recall": round(recall(found["quiver"], truth), 4),
            "qps": round(best["quiver"], 1),
            "first_ms": round(first_ms, 2),
            "exactly_k": exact_k,
            "overfetch_recall": round(recall(found["overfetch"], truth), 4),
            "overfetch_qps": round(best["overfetch"], 1),
            "speedup_vs_overfetch": round(best["quiver"] / best["overfetch"], 2),
        }
    out["min_recall"] = min(s["recall"] for s in out["selectivity"].values())
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(SELECTIVITIES)
    for row in rows:
        ax.plot(names, [row["selectivity"][s]["qps"] for s in names], marker="o", label=f"{row['index']}: filtered")
        ax.plot(names, [row["selectivity"][s]["overfetch_qps"] for s in names], ls="--", marker="x", label="over-fetch")
        ax.axhline(row["unfiltered_qps"], ls=":", color="grey")
    ax.set_yscale("log")
    ax.set_xlabel("share of the catalog passing the filter")
    ax.set_ylabel("queries/s (1 thread, k = 100)")
    ax.set_title("filtered search vs client-side over-fetch (dotted: unfiltered)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n, dim, q = args.items, args.dim, args.queries
    if n < 10 * CATEGORIES:
        print(f"bench/filters.py: --items must be at least {10 * CATEGORIES}", file=sys.stderr)
        return 2
    mixture = mixture_fn()
    data = mixture(n + 2 * q, dim, args.centres, args.spread, args.seed + n)
    perm = np.random.default_rng(args.seed).permutation(len(data))
    queries = np.ascontiguousarray(data[perm[:q]])
    tuning = np.ascontiguousarray(data[perm[q : 2 * q]])
    x = np.ascontiguousarray(data[perm[2 * q :]])
    del data
    category = np.random.default_rng(args.seed + 1).integers(0, CATEGORIES, n)
    names = np.array([f"c{c:03d}" for c in range(CATEGORIES)])

    faiss.omp_set_num_threads(args.build_threads)
    _, tuning_exact = faiss.knn(tuning, x, K, metric=faiss.METRIC_INNER_PRODUCT)
    specs, _ = candidates(n, dim)
    t0 = time.perf_counter()
    winner, _ = choose(specs, x, faiss.METRIC_INNER_PRODUCT, tuning, tuning_exact, FLOOR)
    assert winner.index is not None
    auto_s = time.perf_counter() - t0
    indexes: list[tuple[str, Searcher]] = [(f"auto: {winner.spec.factory}", winner.index)]
    faiss_specs = [s for s in specs if s.backend == "faiss" and s.kind != "flat"]
    if not args.no_faiss_row and winner.spec.backend != "faiss" and faiss_specs:
        ivf = [s for s in faiss_specs if s.kind.startswith("ivf")] or faiss_specs
        faiss.omp_set_num_threads(args.build_threads)
        indexes.append((ivf[0].factory, tuned(ivf[0], x, tuning, tuning_exact)))
    # one Attributes per index, as in the service: its cache keeps what the index's own search needs
    table = pa.table({"category": pa.array(names[category])})
    rows = [
        measure_index(name, index, Attributes(table, {"category": "categorical"}), x, queries, args)
        for name, index in indexes
    ]
    auto_row = rows[0]
    speedup = auto_row["selectivity"]["1%"]["speedup_vs_overfetch"]
    min_recall = min(r["min_recall"] for r in rows)
    result = {
        "bench": "filters",
        "data": f"bench/index.py mixture, {n} x {dim}, {q} held-out queries; category: {CATEGORIES} uniform values",
        "settings": f"k={K}, 1 thread, one query per call, best of {args.rounds} interleaved rounds",
        "auto_index": winner.spec.factory,
        "auto_search": winner.quality.search,
        "auto_recall_unfiltered": round(winner.quality.recall, 4),
        "auto_choose_s": round(auto_s, 1),
        "min_recall": min_recall,
        "speedup_vs_overfetch_1pct": speedup,
        "rows": rows,
        "goal_min_recall": FLOOR,
        "goal_speedup_1pct": GOAL_SPEEDUP,
        "goal_met": bool(min_recall >= FLOOR and speedup >= GOAL_SPEEDUP),
    }
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    plot(rows, out / "filters.png")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
