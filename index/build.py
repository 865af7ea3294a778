"""`quiver-index build`: model bundle -> item tower over the catalog -> FAISS or ScaNN index -> measured recall ->
published.

The index version is a hash of what determines the build (model version, layout or `auto` with its candidates,
requested search parameters, quality-check settings), computed before any work: building the same thing twice finds
the published folder and only re-points CURRENT. Everything that can be refused (bundle, layout, parameters, empty
catalog) is checked before the first item is embedded, and nothing is published until the staged bundle has been
reloaded and verified, so a failed build leaves the published index untouched.

One FAISS layout is filled batch by batch as the item tower produces vectors. ScaNN builds from the whole catalog at
once, and `auto` builds several layouts from the same vectors, so both keep the catalog's (N, D) vectors in memory.
"""

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from index.attributes import catalog_attributes
from index.auto import EXACT_ENOUGH_S, choose, layouts
from index.backend import as_searcher, build_searcher
from index.bundle import (
    check_model,
    ids_array,
    load_index,
    read_index_manifest,
    write_files,
)
from index.factory import AUTO, IndexSpec, build_index, metric_for, metric_name, refines, use_all_cores
from index.lloyd import LLOYD_STEPS
from index.options import DEFAULT_FACTORY, DEFAULT_K, BuildOptions, PublishOptions
from index.publish import commit, current_version, intact, point_current
from index.quality import ExactTopK, Quality, check_floor, measure, query_vectors
from models.bundle import ModelBundle, load_bundle
from models.errors import QuiverError
from models.inputs import item_vectors
from models.publish import staging


@dataclass
class BuildResult:
    path: Path
    version: str
    status: Literal["built", "up_to_date", "repointed"]
    manifest: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        quality = self.manifest.get("quality", {})
        return {
            "status": self.status,
            "name": self.manifest["name"],
            "version": self.version,
            "path": str(self.path),
            "model_version": self.manifest["model"]["version"],
            "index": self.manifest["index"]["factory"],
            "search": self.manifest["index"].get("search", {}),
            "num_items": self.manifest["num_items"],
            f"recall@{quality.get('k', DEFAULT_K)}": quality.get("recall"),
        }


def validate_search(spec: IndexSpec, search: dict[str, int] | None) -> dict[str, int]:
    """Only the index's own knobs may be given (nprobe for IVF, efSearch for HNSW, leaves_to_search and reorder for
    ScaNN), and they must be positive."""
    out = {k: int(v) for k, v in (search or {}).items() if v is not None}
    for name, value in out.items():
        if name not in spec.search_params:
            has = ", ".join(spec.search_params) or "none"
            raise QuiverError(f"index {spec.factory!r}: has no search parameter {name} (it has {has})")
        if value < 1:
            raise QuiverError(f"{name} must be at least 1, got {value}")
    if "nprobe" in out and out["nprobe"] > spec.params["nlist"]:
        raise QuiverError(f"nprobe {out['nprobe']} exceeds nlist {spec.params['nlist']} of {spec.factory!r}")
    if "leaves_to_search" in out and out["leaves_to_search"] > spec.params["leaves"]:
        raise QuiverError(
            f"leaves_to_search {out['leaves_to_search']} exceeds the {spec.params['leaves']} leaves of {spec.factory!r}"
        )
    return out


def index_version(build_key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(build_key, sort_keys=True).encode()).hexdigest()[:16]


def build_key(
    bundle: ModelBundle,
    specs: list[IndexSpec],
    auto: bool,
    search: dict[str, int],
    floor: float,
    k: int,
    queries: int,
    seed: int,
) -> dict[str, Any]:
    """Everything that decides the built index; its hash is the index version. `auto`: the candidates."""
    return {
        "model": {"name": bundle.name, "version": bundle.version},
        "factory": AUTO if auto else specs[0].factory,
        # build parameters the factory string does not carry (HNSW efConstruction, ScaNN's AH settings)
        "params": {s.factory: s.params for s in specs} if auto else specs[0].params,
        "search": search or "auto",
        "quality": {"floor": floor, "k": k, "queries": queries, "seed": seed},
    }


def checked_ids(items: pa.Table, where: Path, empty: str) -> np.ndarray:
    """The table's item ids, refused when the column is missing, the table is empty or an id repeats."""
    if "item_id" not in items.column_names:
        raise QuiverError(f"{where}: no item_id column")
    if items.num_rows == 0:
        raise QuiverError(f"{where}: {empty}")
    ids = ids_array(items.column("item_id").to_pylist())
    if np.unique(ids).size != ids.size:
        raise QuiverError(f"{where}: item_id has duplicates; each row must be a distinct item")
    return ids


def catalog_ids(bundle: ModelBundle) -> np.ndarray:
    return checked_ids(bundle.items, bundle.path / "items.parquet", "the catalog is empty, nothing to index")


def training_sample(bundle: ModelBundle, spec: IndexSpec, batch: int, seed: int) -> np.ndarray | None:
    """(S, D) item vectors of a seeded random subset of the catalog: IVF/PQ codebooks train on it, so only S items
    are embedded twice, whatever the catalog's size."""
    if not spec.needs_training:
        return None
    n = bundle.items.num_rows  # at least spec.min_items(): build() checked
    rows = np.sort(np.random.default_rng(seed).choice(n, size=spec.sample_size(n), replace=False))
    parts = [v for _, v in item_vectors(bundle, items=bundle.items.take(rows), batch=batch)]
    return np.concatenate(parts)


def _existing(parent: Path, version: str) -> dict[str, Any] | None:
    """The manifest of an intact published copy of `version`, else None (a damaged copy is rebuilt and replaced)."""
    folder = parent / version
    return read_index_manifest(folder) if intact(folder) else None


def build(
    model: str | Path,
    out_root: str | Path,
    options: BuildOptions,
    publish: PublishOptions,
    name: str | None = None,
    bundle: ModelBundle | None = None,
) -> BuildResult:
    """Build, verify and publish an index for a model bundle (a version folder or a name folder via LATEST)."""
    bundle = bundle or load_bundle(model)
    run = options.run
    manifest_path = bundle.path / "manifest.json"
    dim = bundle.manifest.get("embedding_dim")
    if not isinstance(dim, int) or dim < 1:
        raise QuiverError(f"{manifest_path}: embedding_dim {dim!r} is not a positive integer")
    metric = metric_for(str(bundle.manifest.get("similarity")))
    request = (options.factory or DEFAULT_FACTORY).strip()
    explicit = layouts(request, None, dim, options.ef_construction)  # a layout is refused before the catalog is read
    floor = options.floor
    if not 0.0 <= floor <= 1.0:
        raise QuiverError(f"recall floor {floor} is not within [0, 1]")
    ids = catalog_ids(bundle)
    attributes = catalog_attributes(bundle)  # a filterable column that is not in the catalog is refused here
    specs, skipped = explicit or layouts(request, len(ids), dim, options.ef_construction)
    auto = request.lower() == AUTO
    if auto and options.search:
        raise QuiverError("--index auto tunes each candidate's search parameters; name a layout to set them")
    search = {} if auto else validate_search(specs[0], options.search)
    if not auto and specs[0].min_items() > len(ids):
        raise QuiverError(
            f"index {specs[0].factory!r}: needs at least {specs[0].min_items()} items to train, "
            f"the catalog has {len(ids)}"
        )
    name = name or bundle.name
    parent = Path(out_root) / name
    key = build_key(bundle, specs, auto, search, floor, options.k, options.num_queries, options.seed)
    version = index_version(key)
    current = current_version(parent)
    if current is not None and current != version:
        # an upsert derived from this very build is newer than it, not out of date
        derived = _existing(parent, current)
        if derived is not None and derived.get("base_version") == version:
            return BuildResult(parent / current, current, "up_to_date", derived)
    existing = _existing(parent, version)
    if existing is not None:
        moved = point_current(parent, version, publish)
        return BuildResult(parent / version, version, "repointed" if moved else "up_to_date", existing)

    started = time.perf_counter()
    threads_used = use_all_cores(run.threads)
    spec = specs[0]
    streamed = not auto and spec.backend == "faiss"
    sample = training_sample(bundle, spec, run.batch, options.seed) if streamed else None
    queries = query_vectors(bundle, options.num_queries, options.seed)  # (Q, D)
    if queries.shape[1] != dim:
        raise QuiverError(f"{manifest_path}: user vectors have dimension {queries.shape[1]}, embedding_dim is {dim}")
    kk = min(options.k, len(ids))
    exact = ExactTopK(queries, kk, metric)

    def batches() -> Any:
        for rows, vectors in item_vectors(bundle, batch=run.batch, progress=run.progress):  # (b, D)
            if vectors.shape[1] != dim:
                raise QuiverError(
                    f"{manifest_path}: item vectors have dimension {vectors.shape[1]}, embedding_dim is {dim}"
                )
            if not np.isfinite(vectors).all():
                raise QuiverError(f"{manifest_path}: the item tower produced non-finite vectors (rows {rows})")
            labels = np.arange(rows.start, rows.stop, dtype=np.int64)
            exact.add(labels, vectors)
            yield labels, vectors

    report: dict[str, Any] | None = None
    quality: Quality
    if streamed:
        index, on_gpu = build_index(spec, dim, metric, batches(), sample, gpu=options.gpu)
        quality = measure(as_searcher(index), spec, queries, exact.result(), floor, search)
    else:
        catalog = np.empty((len(ids), dim), dtype=np.float32)  # (N, D), row = label
        for labels, vectors in batches():
            catalog[labels[0] : labels[-1] + 1] = vectors
        if auto:
            winner, trials = choose(specs, catalog, metric, queries, exact.result(), floor, options.gpu, options.seed)
            assert winner.index is not None
            spec, index, on_gpu, quality = winner.spec, winner.index, winner.on_gpu, winner.quality
            report = {
                "candidates": [t.to_json(t is winner) for t in trials],
                "skipped": skipped,
                "rule": f"fastest at the floor; exact kept while a query costs <= {EXACT_ENOUGH_S * 1e6:g} µs",
                "timing": "qps_single: one query per call, 1 thread, best of 3 interleaved rounds, same run",
            }
        else:
            index, on_gpu = build_searcher(spec, catalog, metric, gpu=options.gpu, seed=options.seed)
            quality = measure(index, spec, queries, exact.result(), floor, search)
        del catalog
    check_floor(quality, floor, run.allow_low_recall, spec.factory)
    manifest = {
        "name": name,
        "version": version,
        "base_version": version,  # the full build this version derives from (itself; upserts keep it)
        "parent_version": None,
        "model": {"name": bundle.name, "version": bundle.version, "similarity": bundle.manifest.get("similarity")},
        "index": {"factory": spec.factory, "type": spec.kind, "params": spec.params, "search": quality.search},
        "metric": metric_name(metric),
        "dim": dim,
        "num_items": len(ids),
        "quality": {**quality.to_json(), "floor": floor, "measured_on": version},
        "build": {
            "key": key,
            "request": request,  # what --index said: `rebuild` asks for it again (auto re-chooses)
            "device": "gpu" if on_gpu else "cpu",
            "threads": threads_used,
            "train_sample": _train_sample(spec, len(ids)),
            # full-catalog Lloyd steps the IVF centroids took after k-means on the sample (index/lloyd.py)
            "lloyd_steps": LLOYD_STEPS if not streamed and refines(spec, len(ids), on_gpu) else 0,
            "seconds": round(time.perf_counter() - started, 3),
        },
    }
    if report is not None:
        manifest["auto"] = report
    with staging(parent) as tmp:
        written = write_files(tmp, index, ids, manifest, attributes)
        check_model(written, bundle.manifest, tmp)
        load_index(tmp, model_manifest=bundle.manifest)  # reload what will be served before publishing it
        final = commit(tmp, version, publish)
    return BuildResult(final, version, "built", written)


def _train_sample(spec: IndexSpec, n: int) -> int:
    """Catalog items the layout's training saw (IVF / PQ codebooks, ScaNN's tree)."""
    if spec.backend == "scann":
        return min(n, int(spec.params["training_sample"]))
    return spec.sample_size(n)
