"""FAISS factory strings Quiver supports, their validation, and building an index from streamed item vectors.

Only a closed set of layouts is accepted (`Flat`, `IVF{nlist},Flat`, `HNSW{M}[,Flat]`, `IVF{nlist},PQ{m}[x{bits}]`),
because every layout must support what the rest of the stage relies on: int64 labels that are rows of `ids.npy`
(so an upsert can replace one item in place), a search-time knob the quality check can sweep, and a CPU copy that
loads without a GPU. Anything else is refused with one line before a single item is embedded.

Labels: every index stores, for each vector, its row in `ids.npy`. Flat and HNSW get them from an `IndexIDMap2`
wrapper (HNSW cannot remove vectors, so an HNSW upsert rebuilds its graph from the stored vectors); IVF layouts
store labels natively and support `remove_ids`.
"""

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import faiss
import numpy as np

from models.errors import QuiverError

Kind = Literal["flat", "hnsw", "ivf_flat", "ivf_pq"]

_PATTERNS: list[tuple[Kind, re.Pattern[str]]] = [
    ("flat", re.compile(r"Flat")),
    ("hnsw", re.compile(r"HNSW(?P<M>\d+)(,Flat)?")),
    ("ivf_flat", re.compile(r"IVF(?P<nlist>\d+),Flat")),
    ("ivf_pq", re.compile(r"IVF(?P<nlist>\d+),PQ(?P<m>\d+)(x(?P<nbits>\d+))?")),
]
SUPPORTED = "Flat, HNSW{M}[,Flat], IVF{nlist},Flat, IVF{nlist},PQ{m}[x{bits}]"
# Candidates an HNSW insertion explores. FAISS defaults to 40; on clustered item vectors (a trained tower's) 200 gives
# a graph that reaches the same recall@100 with far fewer visits: measured on the serve benchmark's 300k DSSM vectors,
# efSearch 128 reaches 0.855 at 200 vs 0.759 at 40, and is faster per query (0.075 vs 0.113 ms), for 3x the build.
HNSW_EF_CONSTRUCTION = 200
METRICS = {"inner_product": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


@dataclass(frozen=True)
class IndexSpec:
    """A validated factory string plus the search-time parameter that trades recall for speed."""

    factory: str  # canonical form, e.g. "HNSW32,Flat"
    kind: Kind
    params: dict[str, int] = field(default_factory=dict)  # M, efConstruction | nlist (+ m, nbits)

    @property
    def needs_training(self) -> bool:
        return self.kind in ("ivf_flat", "ivf_pq")

    @property
    def search_param(self) -> str | None:
        """FAISS ParameterSpace name of the recall/speed knob: nprobe (IVF), efSearch (HNSW), none (Flat)."""
        return {"hnsw": "efSearch", "ivf_flat": "nprobe", "ivf_pq": "nprobe"}.get(self.kind)

    def min_items(self) -> int:
        """Training points IVF k-means (nlist) and PQ codebooks (2^bits) need at the very least."""
        if self.kind == "ivf_flat":
            return self.params["nlist"]
        if self.kind == "ivf_pq":
            return max(self.params["nlist"], 1 << self.params["nbits"])
        return 1

    def sweep(self, k: int) -> list[int]:
        """Candidate values of the search knob, increasing (cheapest first)."""
        if self.kind == "hnsw":
            values = [16, 32, 64, 128, 256, 512, 1024, 2048]
            return sorted({max(v, k) for v in values})
        if self.needs_training:
            nlist = self.params["nlist"]
            values = [1 << i for i in range(nlist.bit_length()) if (1 << i) < nlist]
            return [*values, nlist]
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
        if kind in ("ivf_flat", "ivf_pq") and params["nlist"] < 1:
            raise QuiverError(f"index {factory!r}: IVF nlist must be at least 1")
        if kind == "ivf_pq":
            params.setdefault("nbits", 8)
            text = f"IVF{params['nlist']},PQ{params['m']}x{params['nbits']}"
            if params["m"] < 1 or not 1 <= params["nbits"] <= 16:
                raise QuiverError(f"index {factory!r}: PQ needs m >= 1 and 1 <= bits <= 16")
            if dim is not None and dim % params["m"] != 0:
                raise QuiverError(f"index {factory!r}: PQ{params['m']} does not divide the embedding dimension {dim}")
        return IndexSpec(text, kind, params)
    raise QuiverError(f"index {factory!r}: unknown factory string (supported: {SUPPORTED})")


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
    """FAISS's OpenMP pool on the CPU: every core this process may run on unless told otherwise."""
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
        hnsw = faiss.IndexHNSWFlat(dim, spec.params["M"], metric)
        hnsw.hnsw.efConstruction = spec.params["efConstruction"]
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

    def train(self, sample: np.ndarray) -> None:
        """sample: (n, D) float32 drawn from the catalog."""
        if not self.spec.needs_training:
            return
        if sample.shape[0] < self.spec.min_items():
            raise QuiverError(
                f"index {self.spec.factory!r}: needs at least {self.spec.min_items()} items to train, "
                f"the catalog has {sample.shape[0]}"
            )
        self.index.train(np.ascontiguousarray(sample, dtype=np.float32))

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
) -> tuple[faiss.Index, bool]:
    """Train (IVF) on `sample`, add every (labels, vectors) batch; returns the CPU index and whether a GPU built it."""
    builder = Builder(spec, dim, metric, gpu=gpu)
    if spec.needs_training:
        if sample is None:
            raise QuiverError(f"index {spec.factory!r}: needs a training sample")
        builder.train(sample)
    for labels, vectors in batches:
        builder.add(labels, vectors)
    return builder.finish(), builder.on_gpu
