"""`quiver-index add --items new_items.parquet`: embed only new or changed items and publish a new index version.

Every label is a row of ids.npy, and rows never move: a changed item keeps its row (its old vector is removed and
the new one added under the same label), a new item gets the next row. Flat and IVF indexes remove and add in place;
HNSW cannot remove a vector, so its graph is rebuilt from the vectors it already stores plus the new ones, still
without running the item tower over the rest of the catalog. ScaNN is rebuilt whole the same way, from the catalog
vectors it keeps for re-scoring (dataset.npy) with the changed rows replaced and the new ones appended: its tree and
codebooks train in seconds, and a rebuild keeps them fitted to the catalog. The result holds the same
(label, vector) pairs a full rebuild over the updated catalog would, so an exact (Flat) index returns the same
neighbours.

The new version is a hash of the parent version and the delta, so applying the same file twice is a no-op.
"""

import hashlib
import json
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index.attributes import upsert_attributes
from index.backend import Searcher, as_searcher
from index.build import BuildResult, catalog_ids, checked_ids
from index.bundle import IndexBundle, check_model, ids_array, load_index, write_files
from index.factory import Builder, IndexSpec, ef_construction_of, parse_spec, use_all_cores
from index.options import PublishOptions, RunOptions
from index.publish import commit, point_current
from index.quality import ExactTopK, check_floor, measure, query_vectors
from index.scann_backend import ScannSearcher
from index.scann_backend import build as build_scann
from models.bundle import ModelBundle, load_bundle
from models.errors import QuiverError
from models.inputs import item_vectors
from models.publish import staging


def read_items(path: str | Path) -> pa.Table:
    p = Path(path)
    try:
        table = pq.read_table(p)
    except (OSError, pa.ArrowException) as err:
        raise QuiverError(f"{p}: not a readable Parquet item table ({err})".replace("\n", " ")) from None
    checked_ids(table, p, "no items to add")
    return table


def _conform(table: pa.Table, catalog: pa.Table, where: Path) -> pa.Table:
    """The delta in the catalog's column order and types, so the encoder reads it exactly like the catalog."""
    missing = [c for c in catalog.column_names if c not in table.column_names and c != "popularity"]
    if missing:
        raise QuiverError(f"{where}: missing catalog column(s) {', '.join(missing)}")
    cols = [c for c in catalog.column_names if c in table.column_names]
    try:
        return table.select(cols).cast(pa.schema([catalog.schema.field(c) for c in cols]))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise QuiverError(f"{where}: columns do not match the catalog's types ({err})".replace("\n", " ")) from None


def stored_vectors(index: faiss.Index | Searcher, spec: IndexSpec) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels (N,), vectors (N, D)) held by an index that keeps raw vectors, None for SQ / PQ (lossy codes)."""
    if isinstance(index, ScannSearcher):
        return np.arange(index.ntotal, dtype=np.int64), index.dataset()
    if spec.kind in ("flat", "hnsw"):
        labels = faiss.vector_to_array(index.id_map).astype(np.int64)
        inner = faiss.downcast_index(index.index)
        return labels, inner.reconstruct_n(0, inner.ntotal)
    if spec.kind == "ivf_flat":
        ivf = faiss.extract_index_ivf(index)
        invlists = ivf.invlists
        labels, vectors = [], []
        for lst in range(ivf.nlist):
            size = invlists.list_size(lst)
            if size == 0:
                continue
            labels.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
            codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * invlists.code_size).copy()
            vectors.append(codes.view(np.float32).reshape(size, ivf.d))
        if not labels:
            return np.zeros(0, np.int64), np.zeros((0, ivf.d), np.float32)
        return np.concatenate(labels).astype(np.int64), np.concatenate(vectors)
    return None


def _unchanged(index: faiss.Index | Searcher, spec: IndexSpec, labels: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(n,) bool: which of these labels already hold (to float precision) these (n, D) vectors. SQ / PQ codes are
    lossy, so there every re-sent item counts as changed."""
    out = np.zeros(len(labels), dtype=bool)
    if len(labels) == 0:
        return out
    if isinstance(index, ScannSearcher):
        held = index.dataset()[labels]  # (n, D)
    elif spec.kind in ("flat", "hnsw"):
        held = np.vstack([index.reconstruct(int(label)) for label in labels])  # (n, D)
    elif spec.kind == "ivf_flat":
        stored = stored_vectors(index, spec)
        assert stored is not None
        where = {int(label): j for j, label in enumerate(stored[0])}
        held = stored[1][[where[int(label)] for label in labels]]
    else:
        return out
    return np.all(np.isclose(held, vectors, rtol=1e-6, atol=1e-7), axis=1)


def _apply(
    index: faiss.Index | Searcher, spec: IndexSpec, metric: int, labels: np.ndarray, vectors: np.ndarray
) -> faiss.Index | Searcher:
    """Replace (labels already present) or add (new labels, the rows after the last) vectors; returns the updated
    index (HNSW and ScaNN: a new one)."""
    if isinstance(index, ScannSearcher):
        catalog = index.dataset()
        n = len(catalog)
        grown = np.empty((n + int((labels >= n).sum()), catalog.shape[1]), dtype=np.float32)  # (N', D)
        grown[:n] = catalog
        grown[labels] = vectors
        rebuilt = build_scann(spec, grown, metric)
        rebuilt.configure({"leaves_to_search": index.leaves_to_search, "reorder": index.reorder})
        return rebuilt
    if spec.kind != "hnsw":
        index.remove_ids(labels)
        index.add_with_ids(vectors, labels)
        return index
    held = stored_vectors(index, spec)
    assert held is not None
    old_labels, old_vectors = held
    keep = ~np.isin(old_labels, labels)
    all_labels = np.concatenate([old_labels[keep], labels])
    all_vectors = np.concatenate([old_vectors[keep], vectors])
    order = np.argsort(all_labels, kind="stable")  # label order = catalog order, as in a full build
    builder = Builder(spec, index.d, metric, gpu=False)
    builder.add(all_labels[order], all_vectors[order])
    return builder.finish()


def add_items(
    index_path: str | Path,
    items_path: str | Path,
    run: RunOptions,
    publish: PublishOptions,
    model: str | Path | None = None,
    models_root: str | Path = "artifacts/models",
) -> BuildResult:
    """Upsert the items of a Parquet table into the CURRENT (or given) version of an index and publish the result.

    The model defaults to the exact bundle the index was built from: models_root/<model name>/<model version>."""
    parent_bundle = load_index(index_path)
    model_path = Path(model) if model else Path(models_root) / parent_bundle.model_name / parent_bundle.model_version
    bundle = load_bundle(model_path)
    check_model(parent_bundle.manifest, bundle.manifest, parent_bundle.path)
    delta = _conform(read_items(items_path), bundle.items, Path(items_path))
    catalog_ids(bundle)  # the model's own catalog must be sane too
    return upsert(parent_bundle, bundle, delta, run, publish)


def upsert(
    parent: IndexBundle,
    bundle: ModelBundle,
    delta: pa.Table,
    run: RunOptions,
    publish: PublishOptions,
) -> BuildResult:
    """The parent's layout, build breadth and quality settings are kept (an upsert is not a different index), so only
    how the work runs is an option."""
    started = time.perf_counter()
    use_all_cores(run.threads)
    manifest = parent.manifest
    if manifest["index"].get("backend") == "scann":  # rebuilt with the published tree's settings, as recorded
        spec = IndexSpec(manifest["index"]["factory"], "scann", dict(manifest["index"]["params"]))
    else:  # an HNSW graph is rebuilt with the breadth the published one was built with, read off the index itself
        spec = parse_spec(manifest["index"]["factory"], parent.dim, ef_construction_of(parent.index))
    metric = parent.searcher.metric_type
    delta_ids = ids_array(delta.column("item_id").to_pylist())
    vectors = np.concatenate([v for _, v in item_vectors(bundle, items=delta, batch=run.batch, progress=run.progress)])
    if vectors.shape[1] != parent.dim:
        raise QuiverError(f"{bundle.path}: item vectors have dimension {vectors.shape[1]}, the index has {parent.dim}")
    rows = parent.row_of()
    known = np.fromiter((i in rows for i in delta_ids.tolist()), dtype=bool, count=len(delta_ids))
    # attributes first: an item re-sent with a new price or stock state but the same vector still changes the bundle
    labels = np.empty(len(delta_ids), dtype=np.int64)
    labels[known] = [rows[i] for i in delta_ids[known].tolist()]
    labels[~known] = np.arange(len(parent.ids), len(parent.ids) + int((~known).sum()))
    attributes = None
    if parent.attributes is not None:
        attributes = (upsert_attributes(parent.attributes, delta, labels), parent.attribute_kinds)
    attributes_moved = attributes is not None and not attributes[0].equals(parent.attributes)
    same = _unchanged(parent.index, spec, labels[known], vectors[known])
    if same.any():  # re-sent items whose vector did not move: no index work for them
        keep_rows = np.setdiff1d(np.arange(len(delta_ids)), np.flatnonzero(known)[same])
        delta_ids, vectors, known, labels = (
            delta_ids[keep_rows],
            vectors[keep_rows],
            known[keep_rows],
            labels[keep_rows],
        )
    if len(delta_ids) == 0 and not attributes_moved:
        return BuildResult(parent.path, parent.version, "up_to_date", manifest)
    new_ids = delta_ids[~known]
    digest = hashlib.sha256()
    digest.update(parent.version.encode())
    digest.update(delta_ids.tobytes())
    digest.update(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
    if attributes_moved:
        digest.update(json.dumps(delta.select(list(parent.attribute_kinds)).to_pylist(), default=str).encode())
    version = digest.hexdigest()[:16]
    folder = parent.path.parent
    if (folder / version / "manifest.json").is_file():
        status = "repointed" if point_current(folder, version, publish) else "up_to_date"
        done = load_index(folder / version)
        return BuildResult(done.path, version, status, done.manifest)

    index = parent.index
    if len(delta_ids):
        index = _apply(index, spec, metric, labels, np.ascontiguousarray(vectors, dtype=np.float32))
    ids = ids_array(np.concatenate([parent.ids, new_ids]))
    quality_in = dict(manifest.get("quality", {}))
    held = stored_vectors(index, spec)
    if held is not None and quality_in.get("k"):
        queries = query_vectors(bundle, int(quality_in.get("num_queries") or 1000))
        kk = min(int(quality_in["k"]), len(ids))
        exact = ExactTopK(queries, kk, metric)
        for s in range(0, len(held[0]), run.batch):
            exact.add(held[0][s : s + run.batch], held[1][s : s + run.batch])
        # ScaNN's tree and codebooks were trained afresh (k-means is not reproducible run to run), so its search
        # parameters are tuned to the floor again, as at build; the other layouts keep the parent's
        search = {} if spec.backend == "scann" else manifest["index"].get("search") or {}
        floor = float(quality_in.get("floor", 0.0))
        quality = measure(as_searcher(index), spec, queries, exact.result(), floor, search)
        check_floor(quality, floor, run.allow_low_recall, spec.factory)
        quality_out = {**quality.to_json(), "floor": quality_in.get("floor"), "measured_on": version}
        as_searcher(index).configure(quality.search)
    else:  # SQ / PQ codes cannot give back exact vectors: keep the parent's measurement, saying so
        quality_out = quality_in
    out = {
        **{k: v for k, v in manifest.items() if k not in ("files", "created_at", "format", "kind")},
        "index": {**manifest["index"], "search": quality_out.get("search", manifest["index"].get("search"))},
        "version": version,
        "parent_version": parent.version,
        "num_items": len(ids),
        "quality": quality_out,
        "upsert": {
            "items": len(delta_ids),
            "new": len(new_ids),
            "changed": int(known.sum()),
            "seconds": round(time.perf_counter() - started, 3),
        },
    }
    with staging(folder) as tmp:
        written = write_files(tmp, index, ids, out, attributes)
        load_index(tmp, model_manifest=bundle.manifest)
        final = commit(tmp, version, publish)
    return BuildResult(final, version, "built", written)
