"""Taobao UserBehavior CSV: `user,item,category,behavior,timestamp` rows with no header.

The file is the only source of item attributes: the catalog is item_id + category, taken from each item's first row.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.errors import QuiverError
from training.data.config import DataConfig
from training.data.readers import data_file, main_file, read_delimited, read_side_table, require_file, require_rows
from training.data.schema import SourceTables, interactions_table

COLUMNS = ["user_id", "item_id", "category", "behavior", "timestamp"]
_TYPES = {"user_id": pa.string(), "item_id": pa.string(), "category": pa.string(), "behavior": pa.string(),
          "timestamp": pa.int64()}  # fmt: skip
_CHECKS = {"user_id": "present", "item_id": "present", "behavior": "present", "timestamp": "int"}


def read_taobao(cfg: DataConfig) -> SourceTables:
    train_path = main_file(cfg)
    rows = {"train": read_behavior_file(train_path, cfg.behaviors)}
    if cfg.valid:
        rows["valid"] = read_behavior_file(require_file(data_file(cfg, cfg.valid)), cfg.behaviors)
    if cfg.test:
        rows["test"] = read_behavior_file(require_file(data_file(cfg, cfg.test)), cfg.behaviors)
    if cfg.items:
        items = read_side_table(require_file(data_file(cfg, cfg.items)), "item_id")
    else:
        items = first_categories(pa.concat_tables(rows.values()))
    users = read_side_table(require_file(data_file(cfg, cfg.users)), "user_id") if cfg.users else None
    tables = {key: _events(table) for key, table in rows.items()}
    return SourceTables(
        train=tables["train"],
        valid=tables.get("valid"),
        test=tables.get("test"),
        users=users,
        items=items,
        name=train_path.stem,
    )


def read_behavior_file(path: Path, behaviors: list[str] | None) -> pa.Table:
    """All five columns, keeping only the rows whose behavior is listed (all rows when `behaviors` is None)."""
    table = read_delimited(path, delimiter=",", column_names=COLUMNS, types=_TYPES, checks=_CHECKS)
    require_rows(table, path)
    if behaviors is not None:
        table = table.filter(pc.is_in(table["behavior"], value_set=pa.array(behaviors, type=pa.string())))
        if table.num_rows == 0:
            raise QuiverError(f"{path}: empty data set: no rows with behavior in {behaviors}")
    return table


def first_categories(table: pa.Table) -> pa.Table:
    """item_id + category, one row per item in order of first appearance, category from that first row."""
    encoded = pc.dictionary_encode(table["item_id"]).combine_chunks()
    codes = np.asarray(encoded.indices.to_numpy(zero_copy_only=False))
    _, first_rows = np.unique(codes, return_index=True)  # dictionary order is first-appearance order
    return pa.table({"item_id": encoded.dictionary, "category": pc.take(table["category"], pa.array(first_rows))})


def _events(table: pa.Table) -> pa.Table:
    return interactions_table(table["user_id"], table["item_id"], table["timestamp"])
