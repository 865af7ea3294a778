"""Index layouts Quiver supports (FAISS factory strings and ScaNN trees), their validation, and building a FAISS index
from streamed item vectors (ScaNN's build is index/scann_backend.py's).

Only a closed set of layouts is accepted (`Flat`, `IVF{nlist},Flat`, `IVF{nlist},SQ8`, `HNSW{M}[,Flat]`,
`IVF{nlist},PQ{m}[x{bits}]`, `ScaNN{leaves}[,AH{dims per block}]`), because every layout must support what the rest
of the stage relies on: int64 labels that are rows of `ids.npy` (so an upsert can replace one item in place), search
knobs the quality check can sweep, and a CPU copy that loads without a GPU. Anything else is refused with one line
before a single item is embedded.

Labels: every index stores, for each vector, its row in `ids.npy`. Flat and HNSW get them from an `IndexIDMap2`
wrapper (HNSW cannot remove vectors, so an HNSW upsert rebuilds its graph from the stored vectors); IVF layouts
store labels natively and support `remove_ids`; ScaNN numbers its datapoints in the order it was given them, which
is row order.
"""

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import faiss
import numpy as np

from index.lloyd import lloyd_steps
from models.errors import QuiverError

Kind = Literal["flat", "hnsw", "ivf_flat", "ivf_sq", "ivf_pq", "scann"]
Backend = Literal["faiss", "scann"]

_PATTERNS: list[tuple[Kind, re.Pattern[str]]] = [
    ("flat", re.compile(r"Flat")),
    ("hnsw", re.compile(r"HNSW(?P<M>\d+)(,Flat)?")),
    ("ivf_flat", re.compile(r"IVF(?P<nlist>\d+),Flat")),
    ("ivf_sq", re.compile(r"IVF(?P<nlist>\d+),SQ8")),
    ("ivf_pq", re.compile(r"IVF(?P<nlist>\d+),PQ(?P<m>\d+)(x(?P<nbits>\d+))?")),
    ("scann", re.compile(r"ScaNN(?P<leaves>\d+)(,AH(?P<dims_per_block>\d+))?")),
]
SUPPORTED = "Flat, HNSW{M}[,Flat], IVF{nlist},Flat, IVF{nlist},SQ8, IVF{nlist},PQ{m}[x{bits}], ScaNN{leaves}[,AH{d}]"
AUTO = "auto"  # not a layout: build every candidate that suits the catalog and publish the fastest (index/auto.py)
SCANN = "scann"  # not a layout either: a ScaNN tree sized for the catalog (scann_spec)
# Candidates an HNSW insertion explores. FAISS defaults to 40; on clustered item vectors (a trained tower's) 200 gives
# a graph that reaches the same recall@100 with far fewer visits: measured on the serve benchmark's 300k DSSM vectors,
# efSearch 128 reaches 0.855 at 200 vs 0.759 at 40, and is faster per query (0.075 vs 0.113 ms), for 3x the build.
HNSW_EF_CONSTRUCTION = 200
METRICS = {"inner_product": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
# ScaNN's asymmetric hashing: 2 dimensions per 4-bit code (16 centres) scores a point from 32 nibbles at 64 dims, and
# the anisotropic loss spends the quantisation error where it hurts inner products least. On bench/index.py's 1M
# clustered vectors, 4 dimensions per block (LUT16, or LUT256 codes) needed far more re-scoring for recall@100 0.95 and
# answered slower; thresholds 0.2 to 0.5 came out alike, none at all needed ~40% more leaves and twice the re-scoring.
SCANN_DIMS_PER_BLOCK = 2
SCANN_ANISOTROPIC = 0.2
# Points the tree's k-means trains on, at most. On bench/index.py's 1M clustered vectors (2,000 leaves) training on all
# of them rather than 250k took 30 s instead of 15 and reached recall@100 0.955 at 80 leaves searched instead of 120,
# a third faster per query; beyond 1M items the sample stops growing.
SCANN_TRAINING_SAMPLE = 1_000_000


def ladder(top: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, ... (powers of two and their halfway points, ~1.4x apart) below `top`, then `top`."""
    values = {m << i for i in range(max(1, top.bit_length())) for m in (2, 3)} | {1}
    return [*sorted(v for v in values if v < top), top]


@dataclass(frozen=True)
class IndexSpec:
    """A validated layout plus the search-time parameters that trade recall for speed."""

    factory: str  # canonical form, e.g. "HNSW32,Flat", "ScaNN2000,AH2"
    kind: Kind
    # M, efConstruction | nlist (+ m, nbits) | leaves, dims_per_block, anisotropic_threshold, training_sample
    params: dict[str, int | float] = field(default_factory=dict)

    @property
    def backend(self) -> Backend:
        return "scann" if self.kind == "scann" else "faiss"

    @property
    def needs_training(self) -> bool:
        """A FAISS layout whose coarse quantizer / codebooks train on a sample before any vector is added."""
        return self.kind in ("ivf_flat", "ivf_sq", "ivf_pq")

    @property
    def search_params(self) -> tuple[str, ...]:
        """Names of the recall/speed knobs: nprobe (IVF), efSearch (HNSW), leaves_to_search and reorder (ScaNN)."""
        if self.kind == "scann":
            return ("leaves_to_search", "reorder")
        if self.kind == "hnsw":
            return ("efSearch",)
        return ("nprobe",) if self.needs_training else ()

    def min_items(self) -> int:
        """Training points k-means (nlist, leaves) and PQ codebooks (2^bits) need at the very least."""
        if self.kind in ("ivf_flat", "ivf_sq"):
            return int(self.params["nlist"])
        if self.kind == "ivf_pq":
            return max(int(self.params["nlist"]), 1 << int(self.params["nbits"]))
        if self.kind == "scann":
            return max(int(self.params["leaves"]), 16)  # 16: the centres of each AH block's codebook
        return 1

    def sample_size(self, n: int) -> int:
        """Catalog items a FAISS layout trains on: 64 per IVF list (k-means wants 39..256), enough for the PQ
        codebooks, never more than the catalog."""
        if not self.needs_training:
            return 0
        return min(n, max(64 * int(self.params["nlist"]), 40 * (1 << int(self.params.get("nbits", 0)))))

    def sweep(self, k: int) -> list[int]:
        """Candidate values of a FAISS layout's one search knob, increasing (cheapest first, ~1.4x apart)."""
        if self.kind == "hnsw":
            return sorted({max(v, k) for v in ladder(2048) if v >= 16})  # efSearch below k is pointless
        if self.needs_training:
            return ladder(int(self.params["nlist"]))  # ends exhaustive
        return []


def parse_spec(factory: str, dim: int | None = None, ef_construction: int | None = None) -> IndexSpec:
    """Validate a factory string (and, given the dimension, its PQ split); raise QuiverError naming the problem.
    ef_construction: HNSW's build breadth (default HNSW_EF_CONSTRUCTION); other layouts refuse it."""
    text = factory.replace(" ", "")
    for kind, pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        params = {k: int(v) for k, v in m.groupdict().items() if v is not None}
        if kind == "hnsw":
            text = f"HNSW{params['M']},Flat"
            if not 4 <= params["M"] <= 256:
                raise QuiverError(f"index {factory!r}: HNSW M must be between 4 and 256")
            params["efConstruction"] = HNSW_EF_CONSTRUCTION if ef_construction is None else ef_construction
            if params["efConstruction"] < 1:
                raise QuiverError(f"efConstruction must be at least 1, got {params['efConstruction']}")
        elif ef_construction is not None:
            raise QuiverError(f"index {factory!r}: efConstruction is an HNSW build parameter, this layout has none")
        if kind in ("ivf_flat", "ivf_sq", "ivf_pq") and params["nlist"] < 1:
            raise QuiverError(f"index {factory!r}: IVF nlist must be at least 1")
        if kind == "scann":
            return _scann(factory, params, dim)
        if kind == "ivf_pq":
            params.setdefault("nbits", 8)
            text = f"IVF{params['nlist']},PQ{params['m']}x{params['nbits']}"
            if params["m"] < 1 or not 1 <= params["nbits"] <= 16:
                raise QuiverError(f"index {factory!r}: PQ needs m >= 1 and 1 <= bits <= 16")
            if dim is not None and dim % params["m"] != 0:
                raise QuiverError(f"index {factory!r}: PQ{params['m']} does not divide the embedding dimension {dim}")
        return IndexSpec(text, kind, dict(params))
    raise QuiverError(f"index {factory!r}: unknown factory string (supported: {SUPPORTED}, auto, scann)")


def _scann(factory: str, params: dict[str, int], dim: int | None) -> IndexSpec:
    """A ScaNN tree: refused where the `scann` package is missing (it ships for Linux x86-64 only)."""
    from index.scann_backend import available

    if not available():
        raise QuiverError(f"index {factory!r}: ScaNN is not installed here (pip install scann, Linux x86-64 only)")
    leaves, per_block = params["leaves"], params.get("dims_per_block", SCANN_DIMS_PER_BLOCK)
    if leaves < 1:
        raise QuiverError(f"index {factory!r}: ScaNN needs at least 1 leaf")
    if per_block < 1 or (dim is not None and dim % per_block != 0):
        raise QuiverError(f"index {factory!r}: AH{per_block} does not divide the embedding dimension {dim}")
    out: dict[str, int | float] = {
        "leaves": leaves,
        "dims_per_block": per_block,
        "anisotropic_threshold": SCANN_ANISOTROPIC,
        "training_sample": SCANN_TRAINING_SAMPLE,
    }
    return IndexSpec(f"ScaNN{leaves},AH{per_block}", "scann", out)


def scann_leaves(n: int) -> int:
    """Tree leaves for n items: 2 sqrt(n) (2,000 at 1M, ~500 points a leaf), at least ~100 points a leaf on small
    catalogs so that every leaf's k-means centre and codebook see enough points."""
    return max(1, min(round(2 * n**0.5), n // 100))


def scann_spec(n: int, dim: int | None = None) -> IndexSpec:
    """`--index scann`: the ScaNN tree sized for a catalog of n items."""
    return parse_spec(f"ScaNN{scann_leaves(n)},AH{SCANN_DIMS_PER_BLOCK}", dim)


def unwrapped(index: faiss.Index) -> faiss.Index:
    """The index under an IDMap wrapper (the index itself when it has none)."""
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def ef_construction_of(index: faiss.Index) -> int | None:
    """The efConstruction an HNSW index (bare or in its IDMap) was built with; None for other layouts."""
    inner = unwrapped(index)
    return int(inner.hnsw.efConstruction) if isinstance(inner, faiss.IndexHNSW) else None


def metric_for(similarity: str) -> int:
    """Cosine towers are already L2-normalised, so both of Quiver's similarities are an inner-product search."""
    if similarity in ("cosine", "inner_product"):
        return METRICS["inner_product"]
    if similarity == "l2":
        return METRICS["l2"]
    raise QuiverError(f"model similarity {similarity!r}: no FAISS metric for it (cosine, inner_product, l2)")


def metric_name(metric: int) -> str:
    return "inner_product" if metric == faiss.METRIC_INNER_PRODUCT else "l2"


def use_all_cores(threads: int | None = None) -> int:
    """FAISS's OpenMP pool on the CPU (which ScaNN's searches follow too, index/scann_backend.py): every core this
    process may run on unless told otherwise."""
    n = threads if threads and threads > 0 else len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(n)
    return n


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def empty_index(spec: IndexSpec, dim: int, metric: int) -> faiss.Index:
    """An untrained CPU index whose labels are ids.npy rows (IDMap2 where the layout has no ids of its own)."""
    if spec.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlat(dim, metric))
    if spec.kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, int(spec.params["M"]), metric)
        hnsw.hnsw.efConstruction = int(spec.params["efConstruction"])
        return faiss.IndexIDMap2(hnsw)
    index = faiss.index_factory(dim, spec.factory, metric)
    ivf = faiss.downcast_index(index)
    # FAISS prints its "please provide at least N training points" warning straight to stderr, which would break
    # the CLI's one-line errors; the recall measured at build is the judge of an under-trained index instead.
    ivf.cp.min_points_per_centroid = 1
    if spec.kind == "ivf_pq":
        ivf.pq.cp.min_points_per_centroid = 1
        # The factory turns on polysemous training, which only serves Hamming-filtered search (unused here) and
        # makes training ~10x slower.
        ivf.do_polysemous_training = False
    return index


def set_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """Apply nprobe / efSearch to a CPU index (through its IDMap wrapper if any)."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, int(value))
        except RuntimeError:
            raise QuiverError(f"search parameter {name}={value}: not valid for this index type") from None


def refines(spec: IndexSpec, n: int, on_gpu: bool) -> bool:
    """Whether a build over an in-memory catalog of n items gives its IVF centroids Lloyd steps over all of them
    (index/lloyd.py): IVF layouts whose sample is not the whole catalog, built on the CPU (the GPU path trains as
    FAISS does)."""
    return spec.kind in ("ivf_flat", "ivf_sq", "ivf_pq") and not on_gpu and n > spec.sample_size(n)


class Builder:
    """Adds streamed (labels, vectors) batches to an index, on the GPU when FAISS sees one.

    IVF layouts train on a sample and assign vectors to lists on the GPU (the costly part of their build); Flat's add
    is a copy and HNSW's graph has no FAISS GPU construction short of CAGRA, so both build on the CPU. `finish()`
    returns a CPU index either way, so what is saved loads on a machine without a GPU.
    """

    def __init__(self, spec: IndexSpec, dim: int, metric: int, gpu: bool | None = None) -> None:
        self.spec, self.dim, self.metric = spec, dim, metric
        self.gpu_res: Any = None
        self.index: faiss.Index = empty_index(spec, dim, metric)
        use_gpu = gpu_available() if gpu is None else gpu and gpu_available()
        if use_gpu and spec.needs_training:
            res = faiss.StandardGpuResources()
            try:
                self.index = faiss.index_cpu_to_gpu(res, 0, self.index)
                self.gpu_res = res
            except RuntimeError:  # a layout the GPU code lacks (e.g. an unsupported PQ size): build on the CPU
                self.index = empty_index(spec, dim, metric)

    @property
    def on_gpu(self) -> bool:
        return self.gpu_res is not None

    def train(self, sample: np.ndarray, catalog: np.ndarray | None = None) -> None:
        """sample: (n, D) float32 drawn from the catalog; catalog: (N, D) all of it, where it is in memory: the lists'
        centroids then take Lloyd steps over every item (index/lloyd.py), and the codes train on the result."""
        if not self.spec.needs_training:
            return
        if sample.shape[0] < self.spec.min_items():
            raise QuiverError(
                f"index {self.spec.factory!r}: needs at least {self.spec.min_items()} items to train, "
                f"the catalog has {sample.shape[0]}"
            )
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        if catalog is None or not refines(self.spec, len(catalog), self.on_gpu):
            self.index.train(sample)
            return
        ivf = faiss.extract_index_ivf(self.index)
        ivf.cp.spherical = False  # plain means throughout (FAISS normalises them for inner product): index/lloyd.py
        ivf.train_q1(len(sample), faiss.swig_ptr(sample), False, self.metric)  # FAISS's k-means of the lists alone
        centroids = lloyd_steps(ivf.quantizer.reconstruct_n(0, ivf.nlist), catalog, self.metric)
        ivf.quantizer.reset()
        ivf.quantizer.add(centroids)
        self.index.train(sample)  # keeps a quantizer holding nlist centroids, trains the codes (SQ / PQ) on them

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """labels: (b,) int64 ids.npy rows; vectors: (b, D) float32."""
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise QuiverError(f"item vectors have shape {vectors.shape}, the index dimension is {self.dim}")
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), labels.astype(np.int64))

    def finish(self) -> faiss.Index:
        return faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index


def build_index(
    spec: IndexSpec,
    dim: int,
    metric: int,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    sample: np.ndarray | None = None,
    gpu: bool | None = None,
    catalog: np.ndarray | None = None,
) -> tuple[faiss.Index, bool]:
    """Train (IVF) on `sample`, add every (labels, vectors) batch; returns the CPU index and whether a GPU built it.
    catalog: (N, D) every item, where the caller holds them: an IVF layout's centroids are refined on them."""
    builder = Builder(spec, dim, metric, gpu=gpu)
    if spec.needs_training:
        if sample is None:
            raise QuiverError(f"index {spec.factory!r}: needs a training sample")
        builder.train(sample, catalog)
    for labels, vectors in batches:
        builder.add(labels, vectors)
    return builder.finish(), builder.on_gpu
