"""Index layouts at 100k and 1M items: recall@100 against exact search and queries/s, Quiver's `--index auto` pick
against FAISS HNSW32 in the same run (DESIGN §8, issues #5 and #16).

Vectors imitate a trained item tower's output: L2-normalised points of a Gaussian mixture around a few thousand
random unit centres whose sizes follow a power law (a few huge categories, a long tail), so the lists of an IVF index
are as unbalanced as they are on real catalogs. Queries come from the same mixture but are held out of the index.

Rows: exact Flat (the baseline), FAISS HNSW32 (efSearch sweep), IVF-SQ8 and IVF-PQ fast-scan with exact re-ranking
(nprobe sweeps), hnswlib M32 (a peer, measured when the `hnswlib` module is importable: it is not a Quiver dependency,
see bench/README.md), ScaNN (leaves x re-ranked candidates grid) and `auto`: Quiver's own choice
(index/auto.py: candidates for the catalog size, each tuned to the floor on 1,000 tuning queries of its own, the
fastest kept), measured here on the held-out queries like every other row. For each row: build seconds, RSS growth,
serialized size, and per swept point recall@100 plus queries/s one query per call (`qps_single`) and 64 per call
(`qps_batch64`). Every search runs on one thread (a 2-thread Flat is 2.4x slower per single query than a 1-thread one
on a 2-core machine, which inflated earlier ratios); builds use --build-threads. Each row's fastest point at the floor
is then re-timed against the others in interleaved rounds (best of 3), and those figures make the headline.

Goal at 1M items: the auto pick reaches recall@100 >= 0.95 at >= 1.8x FAISS HNSW32's single-query rate at the floor,
and the whole auto choice (every candidate built, tuned and timed) takes <= 60 s. Prints one JSON line; writes
bench.json and recall_qps.png into --out. HNSW graphs take minutes at 1M: --cache keeps them between runs (the build
seconds recorded are the original build's, marked "cached").

    flock /tmp/quiver-cpu.lock .venv/bin/python bench/index.py [--sizes 100000,1000000] [--cache artifacts/bench/cache]
    .venv/bin/python bench/index.py --sizes 20000 --queries 200      # quick run
"""

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as `python bench/index.py`: the repo's packages come first

from index.auto import candidates, choose, ivf_lists  # noqa: E402
from index.backend import FaissSearcher, Searcher  # noqa: E402
from index.factory import (  # noqa: E402
    HNSW_EF_CONSTRUCTION,
    empty_index,
    gpu_available,
    parse_spec,
    scann_spec,
    use_all_cores,
)
from index.quality import recall  # noqa: E402
from index.scann_backend import available as scann_available  # noqa: E402
from index.speed import one_thread  # noqa: E402

K = 100
FLOOR = 0.95
GOAL_VS_HNSW = 1.8
GOAL_AUTO_S = 60.0
BATCH = 64
ROUNDS = 3

try:
    import hnswlib  # a peer, not a dependency
except ImportError:
    hnswlib = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000", help="catalog sizes, comma-separated")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1000, help="held-out queries for recall and batch QPS")
    p.add_argument("--single", type=int, default=200, help="queries timed one at a time (at most --single-seconds)")
    p.add_argument("--single-seconds", type=float, default=1.0)
    p.add_argument("--centres", type=int, default=2000, help="mixture components")
    p.add_argument("--spread", type=float, default=0.6, help="noise norm around a centre (centres have norm 1)")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=HNSW_EF_CONSTRUCTION, help="HNSW build breadth (%(default)s)")
    p.add_argument("--build-threads", type=int, default=None, help="threads for builds (default: all cores)")
    p.add_argument("--cache", default=None, help="folder keeping built HNSW graphs between runs (default: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="artifacts/bench/index")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    if not args.sizes or min(args.sizes) < 1000 or args.queries < 1 or args.dim < 1:
        p.error("--sizes must be >= 1000 each, --queries and --dim >= 1")
    return args


def mixture(n: int, dim: int, centres: int, spread: float, seed: int) -> np.ndarray:
    """(n, dim) float32 unit vectors: power-law sized clusters (Zipf, exponent 1) around random unit centres."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, centres + 1)
    which = rng.choice(centres, size=n, p=weights / weights.sum())
    out = np.empty((n, dim), dtype=np.float32)
    step = 1 << 18
    for s in range(0, n, step):  # bounded temporaries
        e = min(n, s + step)
        noise = rng.normal(size=(e - s, dim)).astype(np.float32) * (spread / np.sqrt(dim))
        x = c[which[s:e]] + noise
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


Search = Callable[[np.ndarray], np.ndarray]  # (q, D) queries -> (q, K) labels, one call, current parameters


@dataclass
class Row:
    """One index under test: how to build it, set a swept point, and search; what it measured."""

    name: str
    build: Callable[[], Any]
    configure: Callable[[Any, dict[str, int]], Search]  # (index, point) -> a search with that point set
    grid: list[dict[str, int]]  # swept points, cheapest first within each group
    size_mb: Callable[[Any], float | None] = lambda _: None
    group: str | None = None  # the knob fixed along a run of the grid (the others grow); None: one run
    cached: bool = False
    index: Any = None
    result: dict[str, Any] = field(default_factory=dict)


def searcher_row(name: str, build: Callable[[], Searcher], grid: list[dict[str, int]], group: str | None = None) -> Row:
    """A row searched through Quiver's own interface (index/backend.py), as the service searches."""

    def configure(index: Searcher, point: dict[str, int]) -> Search:
        index.configure(point)
        return lambda q: index.search(q, K)[1]

    def size_mb(index: Searcher) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            written = index.save(Path(tmp))
            return round(sum((Path(tmp) / f).stat().st_size for f in written) / 2**20, 1)

    return Row(name, build, configure, grid, size_mb, group)


def single_rate(search: Search, queries: np.ndarray, limit: int, seconds: float) -> float:
    search(queries[:1])  # warm-up
    done, start = 0, time.perf_counter()
    while done < min(limit, len(queries)) and (done < 5 or time.perf_counter() - start < seconds):
        search(queries[done : done + 1])
        done += 1
    return done / (time.perf_counter() - start)


def _single(search: Search, queries: np.ndarray, args: argparse.Namespace) -> float:
    with one_thread():
        return single_rate(search, queries, args.single, args.single_seconds)


def batch_rate(search: Search, queries: np.ndarray) -> tuple[float, np.ndarray]:
    labels = np.empty((len(queries), K), dtype=np.int64)
    start = time.perf_counter()
    for s in range(0, len(queries), BATCH):
        labels[s : s + BATCH] = search(queries[s : s + BATCH])
    return len(queries) / (time.perf_counter() - start), labels


def sweep(row: Row, queries: np.ndarray, exact: np.ndarray, args: argparse.Namespace, threads: int) -> None:
    """Build the row (on `threads`) unless it is built already, then measure every swept point on one thread."""
    rss0, t0 = rss_mb(), time.perf_counter()
    if row.index is None:
        faiss.omp_set_num_threads(threads)
        row.index = row.build()
    build_s = row.result.get("build_s", time.perf_counter() - t0)  # cached rows and auto carry their own
    row.result = {
        "index": row.name,
        "build_s": round(build_s, 2),
        "cached": row.cached,
        "rss_delta_mb": round(rss_mb() - rss0, 1),
        "size_mb": row.size_mb(row.index),
        "points": [],
    }

    def measure(point: dict[str, int]) -> float:
        search = row.configure(row.index, point)
        with one_thread():
            batch, labels = batch_rate(search, queries)
        r = recall(labels, exact)
        row.result["points"].append(
            {
                **point,
                "recall": round(r, 4),
                "qps_batch64": round(batch, 1),
                "qps_single": round(_single(search, queries, args), 1),
            }
        )
        return r

    past: dict[Any, int] = {}  # points at the floor so far, per run of the grid
    missed: dict[Any, dict[str, int]] = {}  # the last point of each run below the floor
    for point in tqdm(row.grid or [{}], desc=f"{row.name} sweep", leave=False, file=sys.stderr):
        run = point.get(row.group) if row.group else None
        if past.get(run, 0) >= 3:
            continue  # further along this run only costs speed
        r = measure(point)
        if r >= FLOOR and not past.get(run) and run in missed:
            refine(missed[run], point, measure)
        if r < FLOOR:
            missed[run] = point
        past[run] = 3 if r >= 0.99 else past.get(run, 0) + (r >= FLOOR)


def refine(low: dict[str, int], high: dict[str, int], measure: Callable[[dict[str, int]], float]) -> None:
    """Halve the gap between a point below the floor and the next one reaching it, in the knob that grows along
    the run, to within 1/16: the same refinement Quiver's own tuning does (index/quality.py), so that every row is
    measured at the cheapest setting that reaches the floor, not at the next grid step above it."""
    (knob,) = [k for k in high if high[k] != low[k]]
    lo, hi = low[knob], high[knob]
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        if measure({**high, knob: mid}) >= FLOOR:
            hi = mid
        else:
            lo = mid


def at_floor(row: Row) -> dict[str, Any] | None:
    """The row's fastest swept point at the floor (single queries), None if no point reaches it."""
    ok = [p for p in row.result["points"] if p["recall"] >= FLOOR]
    return max(ok, key=lambda p: p["qps_single"]) if ok else None


def retime(rows: list[Row], queries: np.ndarray, args: argparse.Namespace) -> None:
    """Each row's point at the floor (Flat: exact), timed in ROUNDS interleaved rounds; each keeps its best."""
    entries = []
    for row in rows:
        best = at_floor(row)
        if best is not None:
            point = {k: v for k, v in best.items() if k not in ("recall", "qps_batch64", "qps_single")}
            entries.append((row, point, best))
    rates = [0.0] * len(entries)
    for _ in range(ROUNDS):
        for i, (row, point, _) in enumerate(entries):
            rates[i] = max(rates[i], _single(row.configure(row.index, point), queries, args))
    for (row, point, best), rate in zip(entries, rates, strict=True):
        row.result["at_floor"] = {**point, "recall": best["recall"], "qps_single": round(rate, 1)}


def faiss_row(name: str, make: Callable[[], faiss.Index], grid: list[dict[str, int]], group: str | None = None) -> Row:
    """A FAISS layout Quiver does not offer (a peer), searched directly."""

    def configure(index: faiss.Index, point: dict[str, int]) -> Search:
        space = faiss.ParameterSpace()
        for key, value in point.items():
            space.set_index_parameter(index, key, value)
        return lambda q: index.search(q, K)[1]

    return Row(name, make, configure, grid, lambda i: round(faiss.serialize_index(i).nbytes / 2**20, 1), group)


def cache_path(args: argparse.Namespace, n: int, kind: str) -> Path | None:
    if not args.cache:
        return None
    key = f"{kind}-M{args.hnsw_m}-efc{args.ef_construction}-n{n}-d{args.dim}-c{args.centres}-s{args.spread}-{args.seed}"
    return Path(args.cache) / key


def hnsw_row(x: np.ndarray, args: argparse.Namespace) -> Row:
    n, dim = x.shape
    path = cache_path(args, n, "faiss-hnsw")
    spec = parse_spec(f"HNSW{args.hnsw_m}", dim, args.ef_construction)
    grid = [{"efSearch": v} for v in (100, 112, 128, 144, 160, 176, 192, 224, 256, 320, 384, 512)]
    row = searcher_row(f"HNSW{args.hnsw_m},Flat", lambda: FaissSearcher(_faiss_hnsw(spec, x, path)), grid)
    if path is not None and path.with_suffix(".json").is_file():
        row.cached = True
        row.result["build_s"] = json.loads(path.with_suffix(".json").read_text())["build_s"]
    return row


def _faiss_hnsw(spec: Any, x: np.ndarray, path: Path | None) -> faiss.Index:
    if path is not None and path.with_suffix(".faiss").is_file():
        return faiss.read_index(str(path.with_suffix(".faiss")))
    t0 = time.perf_counter()
    index = empty_index(spec, x.shape[1], faiss.METRIC_INNER_PRODUCT)
    step = 50_000
    for s in tqdm(range(0, len(x), step), desc="HNSW add", leave=False, file=sys.stderr):
        index.add_with_ids(x[s : s + step], np.arange(s, min(len(x), s + step), dtype=np.int64))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        faiss.write_index(index, str(path.with_suffix(".faiss")))
        path.with_suffix(".json").write_text(json.dumps({"build_s": time.perf_counter() - t0}))
    return index


def hnswlib_row(x: np.ndarray, args: argparse.Namespace, threads: int) -> Row | None:
    if hnswlib is None:
        return None
    n, dim = x.shape
    path = cache_path(args, n, "hnswlib")

    def build() -> Any:
        index = hnswlib.Index(space="ip", dim=dim)
        if path is not None and path.with_suffix(".bin").is_file():
            index.load_index(str(path.with_suffix(".bin")), max_elements=n)
            return index
        t0 = time.perf_counter()
        index.init_index(max_elements=n, ef_construction=args.ef_construction, M=args.hnsw_m, random_seed=args.seed)
        index.set_num_threads(threads)
        index.add_items(x, np.arange(n))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            index.save_index(str(path.with_suffix(".bin")))
            path.with_suffix(".json").write_text(json.dumps({"build_s": time.perf_counter() - t0}))
        return index

    def configure(index: Any, point: dict[str, int]) -> Search:
        index.set_num_threads(1)
        index.set_ef(max(point["ef"], K))
        return lambda q: index.knn_query(q, k=K)[0].astype(np.int64)

    grid = [{"ef": v} for v in (100, 112, 128, 144, 160, 176, 192, 224, 256, 320, 384, 512)]
    row = Row(f"hnswlib M{args.hnsw_m}", build, configure, grid, lambda i: round(i.index_file_size() / 2**20, 1))
    if path is not None and path.with_suffix(".json").is_file():
        row.cached = True
        row.result["build_s"] = json.loads(path.with_suffix(".json").read_text())["build_s"]
    return row


def run_size(n: int, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    dim, q = args.dim, args.queries
    data = mixture(n + 2 * q, dim, args.centres, args.spread, args.seed + n)
    perm = np.random.default_rng(args.seed).permutation(len(data))
    queries = np.ascontiguousarray(data[perm[:q]])  # held out: every figure reported is measured on these
    tuning = np.ascontiguousarray(data[perm[q : 2 * q]])  # held out too: what `auto` tunes on (a build's users)
    x = np.ascontiguousarray(data[perm[2 * q :]])
    del data
    ip = faiss.METRIC_INNER_PRODUCT
    nlist = ivf_lists(n)

    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    _, exact = faiss.knn(queries, x, K, metric=ip)
    exact_s = time.perf_counter() - t0

    def flat() -> faiss.Index:
        index = empty_index(parse_spec("Flat"), dim, ip)
        index.add_with_ids(x, np.arange(n, dtype=np.int64))
        return index

    def ivf(factory: str) -> Callable[[], faiss.Index]:
        def make() -> faiss.Index:
            index = faiss.index_factory(dim, factory, ip)
            ivf_part = faiss.extract_index_ivf(index)
            ivf_part.cp.min_points_per_centroid = 1
            index.train(x[np.random.default_rng(args.seed + 1).choice(n, size=min(n, 64 * nlist), replace=False)])
            index.add(x)
            return index

        return make

    nprobes = [p for p in (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512) if p <= nlist]
    sq, pq = f"IVF{nlist},SQ8", f"IVF{nlist},PQ{dim // 2}x4fs,RFlat"  # PQ: 4-bit fast-scan, k_factor x k re-ranked
    rows = [
        searcher_row("Flat", lambda: FaissSearcher(flat()), []),
        hnsw_row(x, args),
        searcher_row(sq, lambda: FaissSearcher(ivf(sq)()), [{"nprobe": p} for p in nprobes]),
        faiss_row(pq, ivf(pq), [{"k_factor_rf": f, "nprobe": p} for f in (4, 8, 16) for p in nprobes], "k_factor_rf"),
    ]
    peer = hnswlib_row(x, args, threads)
    if peer is not None:
        rows.append(peer)
    if scann_available():
        spec = scann_spec(n, dim)
        leaves = int(spec.params["leaves"])
        from index.scann_backend import build as build_scann

        fractions = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12, 0.16, 0.24, 0.32, 0.48)
        grid = [
            {"reorder": r, "leaves_to_search": max(1, round(leaves * f))}
            for r in (200, 400, 800, 1600)
            for f in fractions
        ]
        rows.append(searcher_row(spec.factory, lambda: build_scann(spec, x, ip), grid, "reorder"))

    # Quiver's own choice, tuned on its own queries; its searcher is then measured like every other row
    specs, skipped = candidates(n, dim)
    t0 = time.perf_counter()
    _, tuning_exact = faiss.knn(tuning, x, K, metric=ip)
    auto_exact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    winner, trials = choose(specs, x, ip, tuning, tuning_exact, FLOOR)
    auto_s = time.perf_counter() - t0
    picked = winner.index
    auto_row = searcher_row(f"auto: {winner.spec.factory}", lambda: picked, [winner.quality.search])
    auto_row.result["build_s"] = auto_s

    if gpu_available():  # exact search on the GPU, for scale (not a CPU rival: many cores, batched best)
        res = faiss.StandardGpuResources()
        rows.append(faiss_row("GPU Flat", lambda: faiss.index_cpu_to_gpu(res, 0, flat()), []))
    for row in [*rows, auto_row]:
        row.index = picked if row is auto_row else None
        sweep(row, queries, exact, args, threads)
    retime([*rows, auto_row], queries, args)

    flat_row, hnsw = rows[0].result, rows[1].result
    auto = auto_row.result.get("at_floor") or {
        "recall": auto_row.result["points"][0]["recall"],
        "qps_single": auto_row.result["points"][0]["qps_single"],
    }
    flat_single = flat_row["at_floor"]["qps_single"]
    hnsw_single = hnsw["at_floor"]["qps_single"] if "at_floor" in hnsw else None
    best = max((r.result for r in rows[1:] if "at_floor" in r.result), key=lambda r: r["at_floor"]["qps_single"])
    return {
        "items": n,
        "dim": dim,
        "queries": q,
        "nlist": nlist,
        "exact_s": round(exact_s, 2),
        "flat_qps_single": flat_single,
        "flat_qps_batch64": flat_row["points"][0]["qps_batch64"],
        "hnsw_qps_single": hnsw_single,
        "auto_index": winner.spec.factory,
        "auto_search": winner.quality.search,
        "auto_recall": auto["recall"],
        "auto_qps_single": auto["qps_single"],
        "auto_vs_hnsw": round(auto["qps_single"] / hnsw_single, 2) if hnsw_single else None,
        "auto_vs_flat": round(auto["qps_single"] / flat_single, 2),
        "auto_build_s": round(auto_s, 1),
        "auto_pick_build_s": round(winner.build_s, 1),
        "auto_exact_s": round(auto_exact_s, 2),
        "auto_candidates": [t.to_json(t is winner) for t in trials],
        "auto_skipped": skipped,
        "best_single": {"index": best["index"], **best["at_floor"]},
        "best_vs_flat": round(best["at_floor"]["qps_single"] / flat_single, 2),
        "indexes": [r.result for r in [*rows, auto_row]],
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        for i, row in enumerate(res["indexes"]):
            pts = sorted(row["points"], key=lambda p: p["recall"])
            r = [p["recall"] for p in pts]
            color = f"C{i}"
            ax.plot(r, [p["qps_single"] for p in pts], "o-", color=color, ms=3, label=f"{row['index']} (single)")
            ax.plot(r, [p["qps_batch64"] for p in pts], "s--", color=color, ms=3, label=f"{row['index']} (x64)")
        ax.axvline(FLOOR, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel(f"recall@{K} vs exact")
        ax.set_ylabel("queries / s (1 thread)")
        ax.set_title(f"{res['items']:,} items x {res['dim']} dims")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = use_all_cores(args.build_threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = [run_size(n, args, threads) for n in args.sizes]
    top = max(results, key=lambda r: r["items"])
    vs_hnsw = top["auto_vs_hnsw"]
    versions = {"faiss": faiss.__version__}
    for peer in ("scann", "hnswlib"):
        try:
            versions[peer] = version(peer)
        except PackageNotFoundError:
            versions[peer] = None
    line = {
        "bench": "index",
        **versions,
        "threads": {"search": 1, "build": threads},
        "gpu": gpu_available(),
        "k": K,
        "floor": FLOOR,
        "goal": f"auto pick: recall@{K} >= {FLOOR} at >= {GOAL_VS_HNSW:g}x FAISS HNSW32's single-query rate, "
        f"auto choice <= {GOAL_AUTO_S:g} s, at {top['items']:,} items",
        "items": top["items"],
        **{key: top[key] for key in ("auto_index", "auto_recall", "auto_qps_single", "hnsw_qps_single")},
        "auto_vs_hnsw": vs_hnsw,
        "auto_build_s": top["auto_build_s"],
        "auto_pick_build_s": top["auto_pick_build_s"],
        "flat_qps_single": top["flat_qps_single"],
        "auto_vs_flat": top["auto_vs_flat"],
        "goal_met": bool(
            top["auto_recall"] >= FLOOR
            and vs_hnsw is not None
            and vs_hnsw >= GOAL_VS_HNSW
            and top["auto_build_s"] <= GOAL_AUTO_S
        ),
        "best_single": top["best_single"],
        "sizes": results,
        "seconds": round(time.perf_counter() - started, 1),
        "plot": str(out / "recall_qps.png"),
        "note": "synthetic clustered unit vectors; every search on 1 thread (builds on threads.build); qps_single = "
        "one query per call, at the floor re-timed in 3 interleaved rounds (best kept); auto tuned on its own held-out "
        "queries; auto_build_s = the whole choice (every candidate built, tuned, timed), auto_pick_build_s = its "
        "pick's build alone; same machine, same run",
    }
    plot(results, out / "recall_qps.png")
    (out / "bench.json").write_text(json.dumps(line) + "\n")
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
