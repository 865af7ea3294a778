"""`quiver-index build`: model bundle -> item tower over the catalog -> FAISS index -> measured recall -> published.

The index version is a hash of what determines the build (model version, factory string, requested search
parameters, quality-check settings), computed before any work: building the same thing twice finds the published
folder and only re-points CURRENT. Everything that can be refused (bundle, factory string, parameters, empty
catalog) is checked before the first item is embedded, and nothing is published until the staged bundle has been
reloaded and verified, so a failed build leaves the published index untouched.
"""

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from index.bundle import (
    check_model,
    ids_array,
    load_index,
    read_index_manifest,
    write_files,
)
from index.factory import IndexSpec, build_index, metric_for, metric_name, parse_spec, use_all_cores
from index.options import DEFAULT_FACTORY, DEFAULT_K, BuildOptions, PublishOptions
from index.publish import commit, current_version, intact, point_current
from index.quality import ExactTopK, check_floor, measure, query_vectors
from models.bundle import ModelBundle, load_bundle
from models.errors import QuiverError
from models.inputs import item_vectors
from models.publish import staging

TRAIN_POINTS_PER_LIST = 64  # IVF k-means sample: FAISS wants 39..256 points per centroid


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
    """Only the index's own knob may be given (nprobe for IVF, efSearch for HNSW), and it must be positive."""
    out = {k: int(v) for k, v in (search or {}).items() if v is not None}
    for name, value in out.items():
        if name != spec.search_param:
            raise QuiverError(f"index {spec.factory!r}: has no search parameter {name} (it has {spec.search_param})")
        if value < 1:
            raise QuiverError(f"{name} must be at least 1, got {value}")
    if "nprobe" in out and out["nprobe"] > spec.params["nlist"]:
        raise QuiverError(f"nprobe {out['nprobe']} exceeds nlist {spec.params['nlist']} of {spec.factory!r}")
    return out


def index_version(build_key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(build_key, sort_keys=True).encode()).hexdigest()[:16]


def build_key(
    bundle: ModelBundle, spec: IndexSpec, search: dict[str, int], floor: float, k: int, queries: int, seed: int
) -> dict[str, Any]:
    """Everything that decides the built index; its hash is the index version."""
    return {
        "model": {"name": bundle.name, "version": bundle.version},
        "factory": spec.factory,
        "params": spec.params,  # build parameters the factory string does not carry (HNSW efConstruction)
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
    n = bundle.items.num_rows
    if n < spec.min_items():
        raise QuiverError(
            f"index {spec.factory!r}: needs at least {spec.min_items()} items to train, the catalog has {n}"
        )
    size = min(n, max(TRAIN_POINTS_PER_LIST * spec.params["nlist"], 40 * (1 << spec.params.get("nbits", 0))))
    rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
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
    spec = parse_spec(options.factory or DEFAULT_FACTORY, dim, options.ef_construction)
    search = validate_search(spec, options.search)
    floor = options.floor
    if not 0.0 <= floor <= 1.0:
        raise QuiverError(f"recall floor {floor} is not within [0, 1]")
    ids = catalog_ids(bundle)
    name = name or bundle.name
    parent = Path(out_root) / name
    key = build_key(bundle, spec, search, floor, options.k, options.num_queries, options.seed)
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
    sample = training_sample(bundle, spec, run.batch, options.seed)
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

    index, on_gpu = build_index(spec, dim, metric, batches(), sample, gpu=options.gpu)
    quality = measure(index, spec, queries, exact.result(), floor, search)
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
            "device": "gpu" if on_gpu else "cpu",
            "threads": threads_used,
            "train_sample": 0 if sample is None else int(sample.shape[0]),
            "seconds": round(time.perf_counter() - started, 3),
        },
    }
    with staging(parent) as tmp:
        written = write_files(tmp, index, ids, manifest)
        check_model(written, bundle.manifest, tmp)
        load_index(tmp, model_manifest=bundle.manifest)  # reload what will be served before publishing it
        final = commit(tmp, version, publish)
    return BuildResult(final, version, "built", written)
