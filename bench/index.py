"""FAISS index types at 100k and 1M items: queries/s and recall@100 against exact search (DESIGN §8, issue #5).

Vectors imitate a trained item tower's output: L2-normalised points of a Gaussian mixture around a few thousand
random unit centres whose sizes follow a power law (a few huge categories, a long tail), so the lists of an IVF index
are as unbalanced as they are on real catalogs. Queries come from the same mixture but are held out of the index.

For every size it measures exact Flat (the baseline), HNSW32 (efSearch sweep), IVF-Flat (nprobe sweep) and IVF-PQ
(nprobe sweep): build seconds, RSS growth and serialized size, recall@100 over all queries, and queries/s both one
query at a time (the online path) and in batches of 64. The goal: at 1M items, an index at recall@100 >= 0.95 with
>= 20x the queries/s of Flat in the same run. `ratio` is that best ratio for single queries, `ratio_batch64` the same
for 64-query batches (where Flat profits from BLAS). Prints one JSON line; writes bench.json and recall_qps.png
into --out.

    flock /tmp/quiver-cpu.lock .venv/bin/python bench/index.py [--sizes 100000,1000000] [--out artifacts/bench/index]
    .venv/bin/python bench/index.py --sizes 20000 --queries 200      # quick run
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as `python bench/index.py`: the repo's packages come first

from index.factory import (  # noqa: E402
    HNSW_EF_CONSTRUCTION,
    empty_index,
    gpu_available,
    parse_spec,
    set_search_params,
    use_all_cores,
)
from index.quality import recall  # noqa: E402

K = 100
FLOOR = 0.95
GOAL = 20.0
BATCH = 64


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000", help="catalog sizes, comma-separated")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1000, help="held-out queries for recall and batch QPS")
    p.add_argument("--single", type=int, default=200, help="queries timed one at a time (at most --single-seconds)")
    p.add_argument("--single-seconds", type=float, default=4.0)
    p.add_argument("--centres", type=int, default=2000, help="mixture components")
    p.add_argument("--spread", type=float, default=0.6, help="noise norm around a centre (centres have norm 1)")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=HNSW_EF_CONSTRUCTION, help="HNSW build breadth (%(default)s)")
    p.add_argument("--threads", type=int, default=None, help="FAISS threads (default: all cores)")
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


def index_mb(index: faiss.Index) -> float:
    return float(faiss.serialize_index(index).nbytes) / 2**20


def qps_batch(index: faiss.Index, queries: np.ndarray) -> tuple[float, np.ndarray]:
    """Queries/s searching BATCH queries per call, and the (Q, K) labels for recall."""
    labels = np.empty((len(queries), K), dtype=np.int64)
    start = time.perf_counter()
    for s in range(0, len(queries), BATCH):
        _, labels[s : s + BATCH] = index.search(queries[s : s + BATCH], K)
    return len(queries) / (time.perf_counter() - start), labels


def qps_single(index: faiss.Index, queries: np.ndarray, limit: int, seconds: float) -> float:
    index.search(queries[:1], K)  # warm-up
    done, start = 0, time.perf_counter()
    while done < min(limit, len(queries)) and (done < 5 or time.perf_counter() - start < seconds):
        index.search(queries[done : done + 1], K)
        done += 1
    return done / (time.perf_counter() - start)


def add_in_chunks(index: faiss.Index, x: np.ndarray, desc: str) -> None:
    step = 50_000
    for s in tqdm(range(0, len(x), step), desc=desc, leave=False, file=sys.stderr):
        e = min(len(x), s + step)
        index.add_with_ids(x[s:e], np.arange(s, e, dtype=np.int64))


def measure(
    name: str,
    build: Callable[[], faiss.Index],
    knob: str | None,
    values: list[int],
    queries: np.ndarray,
    exact: np.ndarray,
    args: argparse.Namespace,
) -> dict[str, Any]:
    rss0, t0 = rss_mb(), time.perf_counter()
    index = build()
    build_s = time.perf_counter() - t0
    row: dict[str, Any] = {
        "index": name,
        "build_s": round(build_s, 2),
        "rss_delta_mb": round(rss_mb() - rss0, 1),
        "size_mb": round(index_mb(index), 1),
        "points": [],
    }
    for value in tqdm(values or [None], desc=f"{name} sweep", leave=False, file=sys.stderr):
        if knob is not None and value is not None:
            set_search_params(index, {knob: value})
        batch, labels = qps_batch(index, queries)
        point = {
            "recall": round(recall(labels, exact), 4),
            "qps_batch64": round(batch, 1),
            "qps_single": round(qps_single(index, queries, args.single, args.single_seconds), 1),
        }
        if knob is not None:
            point[knob] = value
        row["points"].append(point)
        if point["recall"] >= 0.999 and knob is not None:
            break  # larger values only cost speed
    del index
    return row


def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    dim = args.dim
    data = mixture(n + args.queries, dim, args.centres, args.spread, args.seed + n)
    perm = np.random.default_rng(args.seed).permutation(len(data))
    queries = np.ascontiguousarray(data[perm[: args.queries]])  # held out
    x = np.ascontiguousarray(data[perm[args.queries :]])
    del data
    ip = faiss.METRIC_INNER_PRODUCT
    nlist = int(4 * np.sqrt(n) // 256 * 256) or 256  # ~4 sqrt(N), a multiple of 256: 1024 at 100k, 3840 at 1M
    train_n = min(n, 40 * nlist)
    sample = x[np.random.default_rng(args.seed + 1).choice(n, size=train_n, replace=False)]

    def flat() -> faiss.Index:
        index = empty_index(parse_spec("Flat"), dim, ip)
        add_in_chunks(index, x, "Flat add")
        return index

    def hnsw() -> faiss.Index:
        index = empty_index(parse_spec(f"HNSW{args.hnsw_m}", ef_construction=args.ef_construction), dim, ip)
        add_in_chunks(index, x, f"HNSW{args.hnsw_m} add")
        return index

    centroids: list[np.ndarray] = []  # the coarse quantizer, trained once and shared by IVF-Flat and IVF-PQ

    def ivf(factory: str) -> Callable[[], faiss.Index]:
        def make() -> faiss.Index:
            index = empty_index(parse_spec(factory, dim), dim, ip)
            ivf_part = faiss.extract_index_ivf(index)
            if centroids:  # a trained quantizer with nlist entries makes IVF training skip k-means
                ivf_part.quantizer.add(centroids[0])
            index.train(sample)
            if not centroids:
                centroids.append(ivf_part.quantizer.reconstruct_n(0, ivf_part.nlist))
            add_in_chunks(index, x, f"{factory} add")
            return index

        return make

    # Exact neighbours with the baseline index itself (its recall is 1 by construction).
    t0 = time.perf_counter()
    base = flat()
    _, exact = base.search(queries, K)
    exact_s = time.perf_counter() - t0
    del base

    nprobes = [p for p in (4, 8, 16, 32, 64, 128, 256, 512) if p <= nlist]
    pq_m = dim // 2 if dim % 2 == 0 else dim
    rows = [
        measure("Flat", flat, None, [], queries, exact, args),
        measure(f"HNSW{args.hnsw_m},Flat", hnsw, "efSearch", [100, 128, 192, 256, 384, 512], queries, exact, args),
        measure(f"IVF{nlist},Flat", ivf(f"IVF{nlist},Flat"), "nprobe", nprobes, queries, exact, args),
        measure(f"IVF{nlist},PQ{pq_m}", ivf(f"IVF{nlist},PQ{pq_m}"), "nprobe", nprobes, queries, exact, args),
    ]
    if gpu_available():  # GPU Flat and IVF-Flat, searched in batches (one GPU index serves one search at a time)
        res = faiss.StandardGpuResources()
        for name, make in (("GPU Flat", flat), (f"GPU IVF{nlist},Flat", ivf(f"IVF{nlist},Flat"))):
            knob = "nprobe" if "IVF" in name else None
            rows.append(
                measure(
                    name,
                    lambda make=make: faiss.index_cpu_to_gpu(res, 0, make()),
                    knob,
                    nprobes if knob else [],
                    queries,
                    exact,
                    args,
                )
            )
    flat_row = rows[0]["points"][0]
    best: dict[str, Any] = {"single": None, "batch64": None}
    for row in rows[1:]:
        for p in row["points"]:
            if p["recall"] < FLOOR:
                continue
            for mode, key in (("single", "qps_single"), ("batch64", "qps_batch64")):
                if best[mode] is None or p[key] > best[mode][key]:
                    best[mode] = {"index": row["index"], **p}
    ratio = {m: (round(b[f"qps_{m}"] / flat_row[f"qps_{m}"], 2) if b else None) for m, b in best.items()}
    return {
        "items": n,
        "dim": dim,
        "queries": args.queries,
        "nlist": nlist,
        "exact_s": round(exact_s, 2),
        "flat_qps_single": flat_row["qps_single"],
        "flat_qps_batch64": flat_row["qps_batch64"],
        "best_single": best["single"],
        "best_batch64": best["batch64"],
        "ratio_single": ratio["single"],
        "ratio_batch64": ratio["batch64"],
        "indexes": rows,
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        for i, row in enumerate(res["indexes"]):
            r = [p["recall"] for p in row["points"]]
            color = f"C{i}"
            ax.plot(r, [p["qps_single"] for p in row["points"]], "o-", color=color, label=f"{row['index']} (single)")
            ax.plot(r, [p["qps_batch64"] for p in row["points"]], "s--", color=color, label=f"{row['index']} (x64)")
        ax.axvline(FLOOR, color="grey", lw=0.8, ls=":")
        ax.axhline(GOAL * res["flat_qps_single"], color="black", lw=0.8, ls=":", label=f"{GOAL:g}x Flat (single)")
        ax.set_yscale("log")
        ax.set_xlabel(f"recall@{K} vs exact")
        ax.set_ylabel("queries / s")
        ax.set_title(f"{res['items']:,} items x {res['dim']} dims")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = use_all_cores(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = [run_size(n, args) for n in args.sizes]
    top = max(results, key=lambda r: r["items"])
    line = {
        "bench": "index",
        "faiss": faiss.__version__,
        "threads": threads,
        "gpu": gpu_available(),
        "k": K,
        "floor": FLOOR,
        "goal": f"recall@{K} >= {FLOOR} at >= {GOAL:g}x Flat QPS at {top['items']:,} items",
        "items": top["items"],
        "ratio": top["ratio_single"],
        "ratio_batch64": top["ratio_batch64"],
        "goal_met": top["ratio_single"] is not None and top["ratio_single"] >= GOAL,
        "best": top["best_single"],
        "sizes": results,
        "seconds": round(time.perf_counter() - started, 1),
        "plot": str(out / "recall_qps.png"),
        "note": "synthetic clustered unit vectors; IVF-PQ reuses IVF-Flat's coarse quantizer (its build_s excludes "
        "the k-means); qps_single = one query per call, qps_batch64 = 64 per call; same machine, same run",
    }
    plot(results, out / "recall_qps.png")
    (out / "bench.json").write_text(json.dumps(line) + "\n")
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
