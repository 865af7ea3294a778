"""ScaNN as an index backend: a k-means tree over the catalog, asymmetric-hashing (AH) scores inside the leaves
searched, then an exact re-scoring of the best `reorder` candidates.

Files: ScaNN serializes a searcher into scann/ (config and codebooks as protobuf, the catalog, its AH codes and its
leaf assignment as .npy), all checksummed by the manifest. Loading never runs code: scann's own `load_searcher`
would unpickle a `scann_docids.pkl` if one lay in the folder, so it is not used; the native searcher is opened
directly, from an asset list written here (not read from the bundle, so no path in it can point outside the folder),
after each .npy header has been checked to be a plain numeric array of the expected shape (the native reader parses
.npy itself and has no pickle to run). Labels: ScaNN numbers datapoints in the order it was given them, row order.

Threads: a single query (ScaNN's `search`) runs on the calling thread; a batch runs on as many threads as FAISS's
OpenMP pool is set to in the calling thread (the service pins that to QUIVER_TORCH_THREADS, a build to --threads),
so one setting governs both libraries.

The package ships for Linux x86-64 only: elsewhere `available()` is False and Quiver builds FAISS indexes alone.
"""

import contextlib
import importlib.util
import math
import os
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.factory import Backend, IndexSpec, metric_name
from models.errors import QuiverError

FOLDER = "scann"
# (asset type, file) of a tree + AH + float reorder searcher, the only configuration built here
ASSETS = (
    ("AH_CENTERS", "ah_codebook.pb"),
    ("PARTITIONER", "serialized_partitioner.pb"),
    ("TOKENIZATION_NPY", "datapoint_to_token.npy"),
    ("AH_DATASET_NPY", "hashed_dataset.npy"),
    ("DATASET_NPY", "dataset.npy"),
)
CONFIG, ASSETS_TEXT = "scann_config.pb", "scann_assets.pbtxt"
FILES = tuple(f"{FOLDER}/{name}" for name in (*(a for _, a in ASSETS), CONFIG, ASSETS_TEXT))
DISTANCES = {faiss.METRIC_INNER_PRODUCT: "dot_product", faiss.METRIC_L2: "squared_l2"}
NATIVE_METRICS = {"DotProductDistance": faiss.METRIC_INNER_PRODUCT, "SquaredL2Distance": faiss.METRIC_L2}
PARALLEL_MIN = 16  # queries per thread below which a batch is searched on one thread (the pool's hand-off costs more)


@cache
def available() -> bool:
    return importlib.util.find_spec("scann") is not None


def _native() -> Any:
    """scann's pybind module (the C++ searcher), which its Python wrapper puts on sys.path and imports."""
    from scann.scann_ops.py import scann_ops_pybind

    return scann_ops_pybind.scann_pybind


def _assets_text() -> str:
    return "".join(f'assets {{\n  asset_type: {kind}\n  asset_path: "{name}"\n}}\n' for kind, name in ASSETS)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ScaNN's C++ logs every training step to stderr (absl, with no switch to turn it off), which would break the
    CLI's one-line errors: fd 2 goes to /dev/null while it builds."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class ScannSearcher:
    """A ScaNN searcher with the manifest's search parameters. Widening: 4x the leaves per retry, up to all of them;
    at least `width` candidates are re-scored exactly, so a search of every leaf for every item (the over-fetch of
    index/search.py ends there) returns the whole catalog."""

    backend: Backend = "scann"
    selects = False  # no ID selector in ScaNN's search: filters over-fetch (index/filter.py)

    def __init__(self, native: Any, dim: int, n: int, metric: int, leaves: int, dataset: np.ndarray | Path) -> None:
        self.native = native
        self._d, self._n, self._metric, self.leaves = dim, n, metric, leaves
        self._dataset = dataset  # (N, D) float32, or the .npy it was saved to
        self.leaves_to_search = max(1, leaves // 20)
        self.reorder = 200
        self._threads = 0

    @property
    def d(self) -> int:
        return self._d

    @property
    def ntotal(self) -> int:
        return self._n

    @property
    def metric_type(self) -> int:
        return self._metric

    def configure(self, search: dict[str, int]) -> None:
        for name, value in search.items():
            if name not in ("leaves_to_search", "reorder") or int(value) < 1:
                raise QuiverError(f"search parameter {name}={value}: not valid for a ScaNN index")
        self.leaves_to_search = int(search.get("leaves_to_search", self.leaves_to_search))
        self.reorder = int(search.get("reorder", self.reorder))

    def _leaves(self, attempt: int, selectivity: float = 1.0) -> int:
        """4x the leaves per widening; a filter's nearest passing items lie further out: 1 / sqrt(selectivity) more."""
        # plain floats, not numpy scalars: this runs on every query's path (numpy's scalar maths cost ~1 us here)
        return min(self.leaves, math.ceil(self.leaves_to_search * 4**attempt / math.sqrt(max(selectivity, 1e-6))))

    def can_widen(self, attempt: int) -> bool:
        return self._leaves(attempt) < self.leaves

    def search(
        self, queries: np.ndarray, width: int, attempt: int = 0, selector: Any = None, selectivity: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray]:
        q = len(queries)
        # a filter's k passing items lie among about k / selectivity candidates: re-score that many more exactly
        leaves = self._leaves(attempt, selectivity)
        pre = min(self._n, max(math.ceil(self.reorder / max(selectivity, 1e-6)), width))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if q == 1:
            found, dist = self.native.search(queries[0], width, pre, leaves)  # (<= width,) each, never padded
            if len(found) == width:  # the usual single query (bench/index.py's qps_single times this path)
                return dist[None], found.astype(np.int64)[None]
            found, dist = found[None], dist[None]
        else:
            threads = faiss.omp_get_max_threads()
            parallel = threads > 1 and q >= PARALLEL_MIN * threads
            if parallel and threads != self._threads:
                self.native.set_num_threads(threads)
                self._threads = threads
            batch = -(-q // threads) if parallel else 0
            found, dist = self.native.search_batched(queries, width, pre, leaves, parallel, batch)  # NaN: padding
        ok = np.isfinite(dist)
        if found.shape[1] == width and ok.all():  # the usual case, kept cheap: it is on every request's path
            return dist, found.astype(np.int64)
        labels = np.full((q, width), -1, dtype=np.int64)
        scores = np.full((q, width), -np.inf if self._metric == faiss.METRIC_INNER_PRODUCT else np.inf, np.float32)
        got = found.shape[1]
        labels[:, :got] = np.where(ok, found.astype(np.int64), -1)
        scores[:, :got] = np.where(ok, dist, scores[:, :got])
        return scores, labels

    def dataset(self) -> np.ndarray:
        """(N, D) float32: the catalog's vectors in label order, which ScaNN keeps for re-scoring (an upsert rebuilds
        the tree from them)."""
        if isinstance(self._dataset, Path):
            return np.load(self._dataset, allow_pickle=False)
        return self._dataset

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        if isinstance(self._dataset, Path):  # memory-mapped: only the rows asked for are read
            return np.load(self._dataset, mmap_mode="r", allow_pickle=False)[labels]
        return self._dataset[labels]

    def save(self, folder: Path) -> list[str]:
        out = folder / FOLDER
        out.mkdir()
        with _quiet():
            self.native.serialize(str(out), True)  # True: asset paths relative to the folder
        written = {p.name for p in out.iterdir()}
        expected = {f.split("/", 1)[1] for f in FILES}
        listed = set(re.findall(r'asset_type: (\w+)\s+asset_path: "([^"]*)"', (out / ASSETS_TEXT).read_text()))
        if written != expected or listed != set(ASSETS):
            raise QuiverError(f"{out}: ScaNN wrote {sorted(written)} / {sorted(listed)}, not the expected layout")
        return list(FILES)


def build(spec: IndexSpec, vectors: np.ndarray, metric: int) -> ScannSearcher:
    """A searcher over (N, D) vectors (labels = rows), trained on FAISS's OpenMP thread count."""
    if metric not in DISTANCES:
        raise QuiverError(f"ScaNN has no {metric_name(metric)} search")
    n, dim = vectors.shape
    if n < spec.min_items():
        raise QuiverError(f"index {spec.factory!r}: needs at least {spec.min_items()} items, the catalog has {n}")
    if dim % int(spec.params["dims_per_block"]) != 0:
        raise QuiverError(f"index {spec.factory!r}: AH block size does not divide the embedding dimension {dim}")
    from scann.scann_ops.py import scann_ops_pybind

    leaves = int(spec.params["leaves"])
    data = np.ascontiguousarray(vectors, dtype=np.float32)
    # the anisotropic loss weighs errors along each point's direction, which matters to inner products only
    threshold = float(spec.params["anisotropic_threshold"]) if metric == faiss.METRIC_INNER_PRODUCT else float("nan")
    builder = (
        scann_ops_pybind.builder(data, 100, DISTANCES[metric])
        .tree(
            num_leaves=leaves,
            num_leaves_to_search=max(1, leaves // 20),
            training_sample_size=min(n, int(spec.params["training_sample"])),
        )
        .score_ah(int(spec.params["dims_per_block"]), anisotropic_quantization_threshold=threshold)
        .reorder(200)
    )
    builder.set_n_training_threads(faiss.omp_get_max_threads())
    try:
        with _quiet():
            built = builder.build()
    except RuntimeError as err:
        raise QuiverError(f"index {spec.factory!r}: ScaNN could not build ({err})".replace("\n", " ")) from None
    return ScannSearcher(built.searcher, dim, n, metric, leaves, data)


def _npy_header(path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    """dtype and shape from a .npy header, without reading the array; object arrays (pickles) are refused."""
    try:
        with path.open("rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
    except (ValueError, OSError) as err:
        raise QuiverError(f"{path}: not a readable .npy array ({err})".replace("\n", " ")) from None
    if dtype.hasobject or fortran:
        raise QuiverError(f"{path}: holds a {dtype} array (fortran order: {fortran}), not a plain numeric one")
    return dtype, tuple(shape)


def load(folder: Path, dim: int) -> ScannSearcher:
    """The searcher saved in folder/scann (checksums already verified), its metric and shapes checked."""
    root = folder / FOLDER
    kinds = {"dataset.npy": "float32", "hashed_dataset.npy": "uint8", "datapoint_to_token.npy": "int32"}
    headers = {name: _npy_header(root / name) for name in kinds}
    for name, want in kinds.items():
        if headers[name][0] != np.dtype(want):
            raise QuiverError(f"{root / name}: {headers[name][0]} array, expected {want}")
    n = headers["dataset.npy"][1][0] if len(headers["dataset.npy"][1]) == 2 else -1
    if headers["dataset.npy"][1] != (n, dim) or headers["hashed_dataset.npy"][1][:1] != (n,):
        raise QuiverError(f"{root}: dataset.npy / hashed_dataset.npy shapes do not match a {dim}-d catalog")
    if headers["datapoint_to_token.npy"][1] != (n,):
        raise QuiverError(f"{root / 'datapoint_to_token.npy'}: shape does not match the {n} datapoints")
    try:
        native = _native().ScannNumpy(str(root), _assets_text())
    except RuntimeError as err:
        raise QuiverError(f"{root}: not a readable ScaNN searcher ({err})".replace("\n", " ")) from None
    config = native.config()
    measure = re.search(r'distance_measure\s*\{\s*distance_measure:\s*"(\w+)"', config)
    leaves = re.search(r"num_children:\s*(\d+)", config)
    if measure is None or measure.group(1) not in NATIVE_METRICS or leaves is None:
        raise QuiverError(f"{root / CONFIG}: not a tree + AH ScaNN configuration")
    if native.size() != n:
        raise QuiverError(f"{root}: the searcher holds {native.size()} datapoints, dataset.npy {n}")
    return ScannSearcher(native, dim, n, NATIVE_METRICS[measure.group(1)], int(leaves.group(1)), root / "dataset.npy")
