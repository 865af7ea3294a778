"""Sequence-line files: one line per user, `user item item ...` in time order (Amazon S3-Rec, LightGCN).

The files carry no clock, so an event's timestamp is its position on the line. A LightGCN-style test (or valid)
file in the same format continues each user's clock after the train file, so its events come strictly later.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from models.errors import QuiverError
from training.data.config import DataConfig
from training.data.readers import data_file, main_file, read_side_table, require_file, require_rows
from training.data.schema import SourceTables, interactions_table

_NO_DELIMITER = "\x1f"  # read each whole line as one field


def read_sequence_lines(cfg: DataConfig) -> SourceTables:
    train_path = main_file(cfg)
    train = read_sequence_file(train_path)
    valid = test = None
    if cfg.valid is not None:
        valid = read_sequence_file(require_file(data_file(cfg, cfg.valid)), after=train)
    if cfg.test is not None:
        earlier = train if valid is None else pa.concat_tables([train, valid])
        test = read_sequence_file(require_file(data_file(cfg, cfg.test)), after=earlier)
    users = read_side_table(require_file(data_file(cfg, cfg.users)), "user_id") if cfg.users else None
    items = read_side_table(require_file(data_file(cfg, cfg.items)), "item_id") if cfg.items else None
    return SourceTables(train=train, valid=valid, test=test, users=users, items=items, name=train_path.stem)


def read_sequence_file(path: Path, after: pa.Table | None = None) -> pa.Table:
    """Events of a sequence-line file; with `after`, each user's positions start past their latest event there."""
    require_file(path)
    try:
        lines = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=["line"], block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter=_NO_DELIMITER, quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types={"line": pa.string()}),
        )["line"].combine_chunks()
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            raise QuiverError(f"{path}: empty data set (no rows)") from None
        raise QuiverError(f"{path}: cannot be read ({str(exc).splitlines()[0]})") from None
    tokens = pc.utf8_split_whitespace(lines)  # list<string>, one list per non-blank line
    counts = np.asarray(pc.list_value_length(tokens).to_numpy(zero_copy_only=False), dtype=np.int64)
    nonblank = counts > 0
    if not np.all(counts[nonblank] >= 2):
        _raise_bad_line(path)
    if not np.any(nonblank):
        raise QuiverError(f"{path}: empty data set (no rows)")
    tokens = tokens.filter(pa.array(nonblank))
    counts = counts[nonblank]
    users = pc.list_element(tokens, 0)  # (n_lines,)
    if pc.count_distinct(users).as_py() != len(users):
        _raise_repeated_user(path)
    flat = tokens.flatten()  # (sum counts,) user token then its items, line after line
    line_starts = np.r_[0, np.cumsum(counts)[:-1]]  # (n_lines,) flat position of each user token
    is_item = np.ones(len(flat), dtype=bool)
    is_item[line_starts] = False
    per_line = counts - 1  # items per line
    positions = np.arange(len(flat))[is_item] - np.repeat(line_starts + 1, per_line)  # 0, 1, ... within each line
    event_users = pc.take(users, pa.array(np.repeat(np.arange(len(users)), per_line)))
    timestamps = positions + _clock_offsets(event_users, after)
    table = interactions_table(event_users, flat.filter(pa.array(is_item)), pa.array(timestamps))
    require_rows(table, path)
    return table


def _clock_offsets(event_users: pa.Array, after: pa.Table | None) -> np.ndarray:
    """(n,) per event: 1 + the user's latest timestamp in `after` (0 for users absent there)."""
    if after is None or after.num_rows == 0:
        return np.zeros(len(event_users), dtype=np.int64)
    earlier_users = pc.dictionary_encode(after["user_id"]).combine_chunks()
    codes = np.asarray(earlier_users.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    latest = np.full(len(earlier_users.dictionary), -1, dtype=np.int64)
    np.maximum.at(latest, codes, np.asarray(after["timestamp"].to_numpy(), dtype=np.int64))
    found = pc.fill_null(pc.index_in(event_users, value_set=earlier_users.dictionary), -1)
    found = np.asarray(found.to_numpy(zero_copy_only=False), dtype=np.int64)  # (n,) -1 where the user is new
    known = found >= 0
    offsets = np.zeros(len(event_users), dtype=np.int64)
    offsets[known] = latest[found[known]] + 1
    return offsets


def _raise_bad_line(path: Path) -> None:
    for number, fields in _numbered_lines(path):
        if len(fields) < 2:
            raise QuiverError(f"{path}:{number}: expected a user id followed by at least one item, found {fields!r}")
    raise AssertionError("a short line was detected but not found")


def _raise_repeated_user(path: Path) -> None:
    seen: dict[str, int] = {}
    for number, fields in _numbered_lines(path):
        if fields[0] in seen:
            raise QuiverError(f"{path}:{number}: user {fields[0]!r} already has a line ({path}:{seen[fields[0]]})")
        seen[fields[0]] = number
    raise AssertionError("a repeated user was detected but not found")


def _numbered_lines(path: Path) -> list[tuple[int, list[str]]]:
    with path.open("r", encoding="utf-8") as handle:
        return [(number, line.split()) for number, line in enumerate(handle, start=1) if line.strip()]
