"""RecBole atomic files: `<name>.inter`, `<name>.user`, `<name>.item`, tab-separated with a `field:type` header.

Types map to Arrow as: token/token_seq/float_seq -> string (a token_seq stays one space-separated string; the feature
layer splits it), float -> float64. In `.inter` only user_id, item_id and timestamp are used: a rating is not a
weight here, every row counts as one positive event.
"""

from pathlib import Path

import pyarrow as pa

from models.errors import QuiverError
from training.data.config import DataConfig
from training.data.readers import (
    Check,
    data_file,
    data_root,
    read_delimited,
    require_columns,
    require_file,
    require_rows,
    require_unique,
)
from training.data.schema import SourceTables, interactions_table

_ARROW_TYPES = {"token": pa.string(), "token_seq": pa.string(), "float": pa.float64(), "float_seq": pa.string()}


def read_recbole(cfg: DataConfig) -> SourceTables:
    inter_path = _inter_file(cfg)
    name = inter_path.name.split(".")[0]
    folder = inter_path.parent
    valid = read_inter_file(require_file(data_file(cfg, cfg.valid))) if cfg.valid else None
    test = read_inter_file(require_file(data_file(cfg, cfg.test))) if cfg.test else None
    return SourceTables(
        train=read_inter_file(inter_path),
        valid=valid,
        test=test,
        users=_side_table(cfg.users, folder / f"{name}.user", "user_id", cfg),
        items=_side_table(cfg.items, folder / f"{name}.item", "item_id", cfg),
        name=name,
    )


def read_inter_file(path: Path) -> pa.Table:
    table = read_atomic_file(path, required={"user_id": "present", "item_id": "present", "timestamp": "integral"})
    require_columns(table, path, ["user_id", "item_id", "timestamp"])
    require_rows(table, path)
    timestamp = table["timestamp"]
    if pa.types.is_floating(timestamp.type):  # whole numbers: checked by read_delimited
        timestamp = timestamp.cast(pa.int64())
    return interactions_table(table["user_id"], table["item_id"], timestamp)


def read_atomic_file(path: Path, required: dict[str, Check] | None = None) -> pa.Table:
    """Any atomic file: column names from the header with their `:type` stripped, typed as the header says."""
    require_file(path)
    with path.open("r", encoding="utf-8") as handle:
        header = handle.readline().rstrip("\r\n")
    if not header:
        raise QuiverError(f"{path}: empty file (expected a `field:type` header)")
    names: list[str] = []
    types: dict[str, pa.DataType] = {}
    for number, field in enumerate(header.split("\t"), start=1):
        name, sep, kind = field.partition(":")
        if not sep or kind not in _ARROW_TYPES:
            raise QuiverError(
                f"{path}:1: header field {number} {field!r} is not `name:type` with type in {sorted(_ARROW_TYPES)}"
            )
        names.append(name)
        types[name] = _ARROW_TYPES[kind]
    checks = {column: check for column, check in (required or {}).items() if column in types}
    return read_delimited(path, delimiter="\t", column_names=names, skip_rows=1, types=types, checks=checks)


def _inter_file(cfg: DataConfig) -> Path:
    root = data_root(cfg)
    if cfg.train is not None:
        return require_file(data_file(cfg, cfg.train))
    if root.is_file():
        return root
    found = sorted(p for p in root.glob("*.inter") if p.name.count(".") == 1)  # not <name>.train.inter etc.
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise QuiverError(f"data.train: {what} <name>.inter files in {root}; name the interaction file in data.train")
    return found[0]


def _side_table(configured: str | None, default: Path, id_column: str, cfg: DataConfig) -> pa.Table | None:
    if configured is None and not default.is_file():
        return None
    path = require_file(data_file(cfg, configured)) if configured else default
    table = read_atomic_file(path, required={id_column: "present"})
    if id_column not in table.column_names:
        raise QuiverError(f"{path}: missing column '{id_column}' (a {id_column[:-3]} table is keyed by it)")
    table = table.select([id_column] + [c for c in table.column_names if c != id_column])
    require_unique(table, id_column, path)
    return table
