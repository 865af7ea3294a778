"""The native format: interaction, user and item tables as Parquet, CSV or TSV files with a header row."""

from pathlib import Path

import pyarrow as pa

from models.errors import QuiverError
from training.data.config import DataConfig
from training.data.readers import data_file, main_file, read_side_table, read_table_file, require_columns, require_rows
from training.data.schema import SourceTables, interactions_table

_TYPES = {"user_id": pa.string(), "item_id": pa.string(), "timestamp": pa.int64(), "weight": pa.float32()}
_CHECKS = {"user_id": "present", "item_id": "present", "timestamp": "int", "weight": "float"}


def read_interactions(cfg: DataConfig) -> SourceTables:
    train_path = main_file(cfg)
    valid = read_interaction_file(data_file(cfg, cfg.valid)) if cfg.valid else None
    test = read_interaction_file(data_file(cfg, cfg.test)) if cfg.test else None
    users = read_side_table(data_file(cfg, cfg.users), "user_id") if cfg.users else None
    items = read_side_table(data_file(cfg, cfg.items), "item_id") if cfg.items else None
    name = train_path.parent.name if train_path.stem in ("interactions", "train") else train_path.stem
    return SourceTables(
        train=read_interaction_file(train_path), valid=valid, test=test, users=users, items=items, name=name
    )


def read_interaction_file(path: Path) -> pa.Table:
    """user_id, item_id, timestamp (integer seconds) and an optional weight; other columns are ignored."""
    table = read_table_file(path, types=_TYPES, checks=_CHECKS)  # type: ignore[arg-type]
    require_columns(table, path, ["user_id", "item_id", "timestamp"])
    require_rows(table, path)
    for column in ("user_id", "item_id", "timestamp", "weight"):
        if (
            column in table.column_names and table[column].null_count
        ):  # only Parquet gets here with nulls: text files were checked line by line
            raise QuiverError(f"{path}: column '{column}' has {table[column].null_count} empty values")
    weight = table["weight"] if "weight" in table.column_names else None
    return interactions_table(table["user_id"], table["item_id"], table["timestamp"], weight)
