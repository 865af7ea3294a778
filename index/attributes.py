"""The filterable attributes of an index bundle's items: `attributes.parquet`, row i = label i = ids.npy[i].

They live in the index bundle, not only in the model's catalog, because `quiver-index add` puts items into the
index that the model bundle never saw: the upsert writes their attributes beside their vectors, so a filter judges
every served item by its current attributes. The manifest's `attributes` maps each column to its kind
(models/attributes.py); the file is checksummed with the rest of the bundle.
"""

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.attributes import Kind, recorded_filterable
from models.bundle import ModelBundle
from models.errors import QuiverError

ATTRIBUTES_FILE = "attributes.parquet"


def catalog_attributes(bundle: ModelBundle) -> tuple[pa.Table, dict[str, Kind]]:
    """The catalog's filterable columns in catalog (= label) order, and their kinds."""
    kinds = recorded_filterable(bundle.manifest, bundle.items)
    return bundle.items.select(list(kinds)), kinds


def upsert_attributes(parent: pa.Table, delta: pa.Table, labels: np.ndarray) -> pa.Table:
    """The parent's rows with the delta's rows written at `labels` (labels past the end are new items, which get the
    next rows). delta: the upserted items in the catalog's column types, row j going to labels[j]."""
    n = parent.num_rows
    total = max(n, int(labels.max(initial=-1)) + 1)
    combined = pa.concat_tables([parent, delta.select(parent.column_names).cast(parent.schema)])
    take = np.arange(total, dtype=np.int64)  # row of `combined` that each label reads
    take[labels] = n + np.arange(len(labels))
    return combined.take(pa.array(take))


def write_attributes(folder: Path, table: pa.Table) -> str:
    pq.write_table(table, folder / ATTRIBUTES_FILE)
    return ATTRIBUTES_FILE


def read_attributes(folder: Path, manifest: dict[str, Any]) -> tuple[pa.Table, dict[str, Kind]] | None:
    """The bundle's attribute table and kinds, checked against the manifest; None for bundles without one."""
    kinds = manifest.get("attributes")
    if kinds is None:
        return None
    path = folder / ATTRIBUTES_FILE
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise QuiverError(f"{path}: not a readable Parquet table ({err})".replace("\n", " ")) from None
    if table.num_rows != int(manifest["num_items"]) or sorted(table.column_names) != sorted(kinds):
        raise QuiverError(
            f"{path}: {table.num_rows} rows and columns {table.column_names}, the manifest says "
            f"{manifest['num_items']} items with columns {sorted(kinds)}"
        )
    return table, dict(kinds)
