"""The one search interface of the index stage and the service, whichever library holds the vectors.

A `Searcher` takes (q, D) float32 queries and a width, and answers (q, width) scores and int64 labels (rows of
ids.npy) best first, with label -1 where it found fewer than `width`; `attempt` > 0 asks for a wider, slower search
of the same queries, which index/search.py uses when exclusions leave a user short of k. `metric_type` is FAISS's
metric constant for both libraries, so a bundle's metric is checked one way. Each searcher writes its own files into
a bundle folder and names them, so index/bundle.py checksums and reloads them without knowing the library.

ScaNN's searcher (index/scann_backend.py) is a `Searcher` itself. A FAISS index stays a plain `faiss.Index` wherever
it is held (bundles, upserts, the tools that clone or inspect one) and `as_searcher` wraps it, statelessly, where a
search needs the interface: its search parameters live in the FAISS object.
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from index.factory import Backend, IndexSpec, build_index, set_search_params, unwrapped
from models.errors import QuiverError

FAISS_FILE = "index.faiss"
CHUNK = 65536  # vectors per add call when a FAISS index is built from an in-memory catalog


class Searcher(Protocol):
    backend: Backend
    selects: bool  # search() can restrict itself to a selector's labels (else filters over-fetch)

    @property
    def d(self) -> int: ...

    @property
    def ntotal(self) -> int: ...

    @property
    def metric_type(self) -> int: ...

    def search(
        self, queries: np.ndarray, width: int, attempt: int = 0, selector: Any = None, selectivity: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """queries (q, D) -> scores (q, width) float32, labels (q, width) int64 (-1: nothing there). selector (only
        where `selects`): a FAISS IDSelector the labels must pass, which `selectivity` of the catalog does."""
        ...

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        """(len(labels), D) float32: the stored vectors of these labels (decoded, for lossy codes)."""
        ...

    def can_widen(self, attempt: int) -> bool:
        """Whether search(..., attempt + 1) looks further than search(..., attempt)."""
        ...

    def configure(self, search: dict[str, int]) -> None:
        """Make these search parameters (the manifest's `index.search`) the default of every search."""
        ...

    def save(self, folder: Path) -> list[str]:
        """Write the index into `folder`; returns the paths written, relative to it."""
        ...


class FaissSearcher:
    """A CPU FAISS index. Widening: HNSW explores at least as many candidates as it is asked for (efSearch >= width),
    IVF probes 4x more lists per retry, up to all of them (then it is exact); Flat is exact already."""

    backend: Backend = "faiss"
    selects = True

    def __init__(self, index: faiss.Index) -> None:
        self.index = index
        inner = unwrapped(index)
        self._hnsw = inner.hnsw if isinstance(inner, faiss.IndexHNSW) else None
        self._ivf = faiss.try_extract_index_ivf(index)

    @property
    def d(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def metric_type(self) -> int:
        return int(self.index.metric_type)

    def _nprobe(self, attempt: int, selectivity: float = 1.0) -> int:
        """Lists to probe: 4x per widening; a filter's nearest passing items lie further out, so 1 / sqrt(selectivity)
        more lists as well."""
        assert self._ivf is not None
        return int(min(self._ivf.nlist, np.ceil(self._ivf.nprobe * 4**attempt / np.sqrt(max(selectivity, 1e-6)))))

    def can_widen(self, attempt: int) -> bool:
        return self._ivf is not None and self._nprobe(attempt) < self._ivf.nlist

    def _params(self, width: int, attempt: int, selector: Any, selectivity: float) -> faiss.SearchParameters | None:
        p: faiss.SearchParameters | None = None
        if self._hnsw is not None:
            p = faiss.SearchParametersHNSW()
            # a filtered graph walk meets passing items at the filter's rate: widen its candidate list to match
            p.efSearch = int(min(self.ntotal, max(int(self._hnsw.efSearch), width) / max(selectivity, 1e-6)))
        elif self._ivf is not None and (attempt > 0 or selector is not None):
            p = faiss.SearchParametersIVF()
            p.nprobe = self._nprobe(attempt, selectivity)
        elif selector is not None:
            p = faiss.SearchParameters()
        if selector is not None:
            assert p is not None
            p.sel = selector  # IndexIDMap2 translates it to its inner ids itself
        return p

    def search(
        self, queries: np.ndarray, width: int, attempt: int = 0, selector: Any = None, selectivity: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, width, params=self._params(width, attempt, selector, selectivity))

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        if self._ivf is not None and self._ivf.direct_map.type == faiss.DirectMap.NoMap:
            self._ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # labels are arbitrary after upserts
        return self.index.reconstruct_batch(np.ascontiguousarray(labels, dtype=np.int64))

    def configure(self, search: dict[str, int]) -> None:
        set_search_params(self.index, search)

    def save(self, folder: Path) -> list[str]:
        faiss.write_index(self.index, str(folder / FAISS_FILE))
        return [FAISS_FILE]


def as_searcher(index: "faiss.Index | Searcher") -> Searcher:
    return FaissSearcher(index) if isinstance(index, faiss.Index) else index


def files_of(backend: str) -> tuple[str, ...]:
    """The files a bundle of this backend must hold (besides ids.npy and the manifest)."""
    if backend == "faiss":
        return (FAISS_FILE,)
    if backend == "scann":
        from index.scann_backend import FILES

        return FILES
    raise QuiverError(f"unknown index backend {backend!r} (faiss, scann)")


def open_index(folder: Path, manifest: dict[str, Any], mmap: bool = False) -> "faiss.Index | Searcher":
    """The index saved in a bundle folder whose checksums were verified (a FAISS index, or ScaNN's searcher);
    refuses what its library cannot read.

    mmap: map a FAISS index's codes (flat storage, IVF lists, HNSW's vectors) read-only from the file instead of
    copying them, so worker processes serving one bundle share those pages; the index must then never be written
    (the service only searches). A layout FAISS cannot map is read into memory as usual."""
    backend = str(manifest["index"].get("backend", "faiss"))  # bundles from before ScaNN name no backend
    files_of(backend)
    if backend == "scann":
        from index.scann_backend import load

        return load(folder, int(manifest["dim"]))
    if mmap:
        with contextlib.suppress(RuntimeError):
            return faiss.read_index(str(folder / FAISS_FILE), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    try:
        index = faiss.read_index(str(folder / FAISS_FILE))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unreadable"
        raise QuiverError(f"{folder / FAISS_FILE}: not a readable FAISS index ({first})") from None
    return index


def _chunks(vectors: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for s in range(0, len(vectors), CHUNK):
        yield np.arange(s, min(len(vectors), s + CHUNK), dtype=np.int64), vectors[s : s + CHUNK]


def build_searcher(
    spec: IndexSpec, vectors: np.ndarray, metric: int, gpu: bool | None = None, seed: int = 0
) -> tuple[Searcher, bool]:
    """An index over a catalog held in memory, (N, D) float32 with labels = rows; returns it and whether a GPU
    trained it. FAISS layouts train on a seeded sample of the rows (spec.sample_size), ScaNN on its own."""
    if spec.backend == "scann":
        from index.scann_backend import build

        return build(spec, vectors, metric), False
    sample = None
    if spec.needs_training:
        n = len(vectors)
        if n < spec.min_items():
            raise QuiverError(
                f"index {spec.factory!r}: needs at least {spec.min_items()} items to train, the catalog has {n}"
            )
        rows = np.sort(np.random.default_rng(seed).choice(n, size=spec.sample_size(n), replace=False))
        sample = vectors[rows]
    index, on_gpu = build_index(spec, vectors.shape[1], metric, _chunks(vectors), sample, gpu=gpu, catalog=vectors)
    return FaissSearcher(index), on_gpu
