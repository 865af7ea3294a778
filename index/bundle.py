"""Index bundles (DESIGN §6): one index (FAISS or ScaNN), its row -> item id table, and a manifest tying it to a
model version.

    artifacts/indexes/<name>/<version>/
        manifest.json   model bundle name + version, index backend/factory/type/params/search params, metric, dim,
                        item count, recall measured at build, sha256 of every file, version
        index.faiss     a CPU FAISS index (loads without a GPU); its int64 labels are rows of ids.npy
        scann/          or a ScaNN searcher (index/scann_backend.py): protobuf + .npy files, datapoint i = row i
        ids.npy         row -> item id, fixed-width unicode (np.load(allow_pickle=False) never runs code)
        attributes.parquet  row -> the item's filterable attributes (index/attributes.py), when the model has any
    artifacts/indexes/<name>/CURRENT   one line: the version the service loads

Loading verifies checksums before FAISS or ScaNN parses a byte, so a truncated or modified file is refused with a
message naming it rather than crashing the reader; a bundle built for another model version is refused too, because
item vectors from one model are meaningless to another model's user tower.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from index.attributes import read_attributes, write_attributes
from index.backend import FAISS_FILE, Searcher, as_searcher, files_of, open_index
from index.factory import metric_for, metric_name
from models.attributes import Kind
from models.bundle import load_manifest_json, resolve_version, sha256_file, verify_files
from models.errors import QuiverError
from models.publish import MANIFEST

FORMAT = 1
KIND = "quiver-index"
INDEX_FILE = FAISS_FILE
IDS_FILE = "ids.npy"
CURRENT = "CURRENT"


def ids_array(ids: list[str] | np.ndarray) -> np.ndarray:
    """(N,) fixed-width unicode: saved and loaded without pickle (an object array would need it)."""
    arr = np.asarray([str(i) for i in ids])
    return arr.astype(f"<U{max(1, arr.dtype.itemsize // 4)}") if arr.size else np.zeros(0, dtype="<U1")


@dataclass
class IndexBundle:
    path: Path
    manifest: dict[str, Any]
    index: faiss.Index | Searcher  # a CPU FAISS index or ScaNN's searcher, search params of the manifest applied
    ids: np.ndarray  # (N,) <U: label -> item id
    attributes: pa.Table | None = None  # (N rows) label -> filterable attributes; None: the bundle has none
    attribute_kinds: dict[str, Kind] = field(default_factory=dict)
    _rows: dict[str, int] | None = field(default=None, repr=False)

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def model_name(self) -> str:
        return str(self.manifest["model"]["name"])

    @property
    def model_version(self) -> str:
        return str(self.manifest["model"]["version"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def metric(self) -> str:
        return str(self.manifest["metric"])

    @property
    def searcher(self) -> Searcher:
        """The index behind index/backend.py's one search interface."""
        return as_searcher(self.index)

    def row_of(self) -> dict[str, int]:
        """item id -> label, built once on first use (exclusion lists and upserts need it)."""
        if self._rows is None:
            self._rows = {item: row for row, item in enumerate(self.ids.tolist())}
        return self._rows


def write_files(
    folder: Path,
    index: faiss.Index | Searcher,
    ids: np.ndarray,
    manifest: dict[str, Any],
    attributes: tuple[pa.Table, dict[str, Kind]] | None = None,
) -> dict[str, Any]:
    """Write the index's files, ids.npy, the items' filterable attributes (when given: a table of len(ids) rows and
    the kind of each column) and manifest.json (with checksums) into `folder`; returns the manifest."""
    if ids.dtype.kind != "U":
        raise QuiverError(f"{folder / IDS_FILE}: ids must be a fixed-width unicode array, got {ids.dtype}")
    searcher = as_searcher(index)
    written = searcher.save(folder)
    np.save(folder / IDS_FILE, ids, allow_pickle=False)
    manifest = {k: v for k, v in manifest.items() if k != "attributes"}
    if attributes is not None:
        if attributes[0].num_rows != len(ids):
            raise QuiverError(f"{folder}: {attributes[0].num_rows} attribute rows for {len(ids)} items")
        written.append(write_attributes(folder, attributes[0]))
        manifest["attributes"] = attributes[1]
    out = {
        **manifest,
        "index": {**manifest["index"], "backend": searcher.backend},
        "format": FORMAT,
        "kind": KIND,
        "files": {rel: sha256_file(folder / rel) for rel in (*written, IDS_FILE)},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (folder / MANIFEST).write_text(json.dumps(out, indent=2, sort_keys=True))
    return out


def resolve_index(path: str | Path) -> Path:
    """A version folder, or an index name folder whose CURRENT names one."""
    return resolve_version(path, CURRENT, "an index bundle")


def read_index_manifest(path: Path) -> dict[str, Any]:
    manifest = load_manifest_json(path)
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND or manifest.get("format") != FORMAT:
        raise QuiverError(f"{path / MANIFEST}: not a format-{FORMAT} index bundle manifest")
    for key in ("version", "name", "model", "index", "metric", "dim", "num_items", "files"):
        if key not in manifest:
            raise QuiverError(f"{path / MANIFEST}: missing field {key!r}")
    return manifest


def verify_index_files(path: Path, manifest: dict[str, Any]) -> None:
    backend = manifest["index"].get("backend", "faiss") if isinstance(manifest["index"], dict) else None
    try:
        required = files_of(str(backend))
    except QuiverError as err:
        raise QuiverError(f"{path / MANIFEST}: {err}") from None
    verify_files(path, manifest, "index bundle", required=(*required, IDS_FILE))


def check_model(manifest: dict[str, Any], model_manifest: dict[str, Any], where: Path) -> None:
    """Refuse a pairing whose model version, dimension or metric differs from the loaded model bundle's."""
    want, have = str(manifest["model"]["version"]), str(model_manifest.get("version"))
    if want != have:
        raise QuiverError(f"{where / MANIFEST}: built for model version {want}, the loaded model is version {have}")
    dim = model_manifest.get("embedding_dim")
    if dim is not None and int(dim) != int(manifest["dim"]):
        raise QuiverError(f"{where / MANIFEST}: index dimension {manifest['dim']} != model embedding_dim {dim}")
    metric = metric_name(metric_for(str(model_manifest.get("similarity"))))
    if metric != manifest["metric"]:
        raise QuiverError(f"{where / MANIFEST}: index metric {manifest['metric']} does not match the model's {metric}")


def load_index(
    path: str | Path,
    model_version: str | None = None,
    model_manifest: dict[str, Any] | None = None,
    verify: bool = True,
    mmap: bool = False,
) -> IndexBundle:
    """Load an index bundle (a version folder, or a name folder via CURRENT), refusing anything that fails to verify.

    `model_manifest` (or just `model_version`) is the model it will be paired with: any mismatch is refused.
    `mmap`: a read-only, memory-mapped FAISS index (index.backend.open_index), for processes that only search."""
    p = resolve_index(path)
    manifest = read_index_manifest(p)
    if verify:
        verify_index_files(p, manifest)
    if model_manifest is not None:
        check_model(manifest, model_manifest, p)
    elif model_version is not None and str(manifest["model"]["version"]) != str(model_version):
        raise QuiverError(
            f"{p / MANIFEST}: built for model version {manifest['model']['version']}, "
            f"the loaded model is version {model_version}"
        )
    index = open_index(p, manifest, mmap)
    try:
        ids = np.load(p / IDS_FILE, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise QuiverError(f"{p / IDS_FILE}: not a readable id array ({err})".replace("\n", " ")) from None
    if ids.ndim != 1 or ids.dtype.kind != "U":
        raise QuiverError(f"{p / IDS_FILE}: expected a 1-d unicode array, got {ids.dtype} {ids.shape}")
    searcher = as_searcher(index)
    where = p / files_of(str(manifest["index"].get("backend", "faiss")))[0]
    if searcher.d != int(manifest["dim"]):
        raise QuiverError(f"{where}: dimension {searcher.d} != manifest dim {manifest['dim']}")
    if searcher.ntotal != len(ids) or searcher.ntotal != int(manifest["num_items"]):
        raise QuiverError(
            f"{where}: holds {searcher.ntotal} vectors, ids.npy {len(ids)}, manifest {manifest['num_items']}"
        )
    metric = metric_name(searcher.metric_type)
    if metric != manifest["metric"]:
        raise QuiverError(f"{where}: a {metric} index, the manifest says {manifest['metric']}")
    searcher.configure(manifest["index"].get("search") or {})
    attributes = read_attributes(p, manifest)
    if attributes is None:
        return IndexBundle(p, manifest, index, ids)
    return IndexBundle(p, manifest, index, ids, attributes[0], attributes[1])
