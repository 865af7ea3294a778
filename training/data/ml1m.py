"""MovieLens-1M: the original `::` files plus, when present, the NCF protocol split.

users.dat  UserID::Gender::Age::Occupation::Zip-code      -> user_id, gender, age, occupation, zip (all strings)
movies.dat MovieID::Title::Genres (Latin-1)               -> item_id, title, genres ("A|B|C"), year (from the title)
ratings.dat UserID::MovieID::Rating::Timestamp            -> every rating is one positive event
train.tsv  user_id, movie_id (no time: timestamp 0)       -> NCF train
test.tsv   user_id, movie_id, rating, timestamp           -> NCF test, one latest rating per user
test_negatives.tsv  user_id, 99 space-separated movie ids -> NCF sampled negatives

train.tsv (or data.train naming an NCF-style .tsv) selects the published split, whatever data.split says: the
file has no timestamps to re-split by. Otherwise ratings.dat is read and split by data.split.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.errors import QuiverError
from training.data.config import DataConfig
from training.data.readers import (
    data_file,
    data_root,
    read_delimited,
    read_negatives,
    require_columns,
    require_file,
    require_rows,
    require_unique,
)
from training.data.schema import SourceTables, interactions_table

_YEAR = r"\((?P<year>\d{4})\)\s*$"


def read_ml1m(cfg: DataConfig) -> SourceTables:
    root = data_root(cfg)
    if not root.is_dir():
        raise QuiverError(f"data.path: the ml1m format reads a folder (users.dat, movies.dat, ...), got file {root}")
    train_path = data_file(cfg, cfg.train or ("train.tsv" if (root / "train.tsv").is_file() else "ratings.dat"))
    users = read_users(require_file(data_file(cfg, cfg.users or "users.dat")))
    items = read_movies(require_file(data_file(cfg, cfg.items or "movies.dat")))
    negatives_path = data_file(cfg, cfg.negatives or "test_negatives.tsv")
    negatives = read_negatives(negatives_path) if cfg.negatives or negatives_path.is_file() else None
    if train_path.suffix == ".dat":
        if cfg.split == "explicit":
            raise QuiverError(
                f"data.split: an explicit ML-1M split needs the NCF files (train.tsv, test.tsv) in {root}; "
                "ratings.dat is split leave_last_out"
            )
        return SourceTables(
            train=read_ratings(require_file(train_path)), users=users, items=items, name=root.name,
            test_negatives=negatives,
        )  # fmt: skip
    test_path = require_file(data_file(cfg, cfg.test or "test.tsv"))
    valid = read_ncf_test(require_file(data_file(cfg, cfg.valid))) if cfg.valid else None
    return SourceTables(
        train=read_ncf_train(require_file(train_path)),
        valid=valid,
        test=read_ncf_test(test_path),
        users=users,
        items=items,
        name=root.name,
        test_negatives=negatives,
        published_split=True,
    )


def read_users(path: Path) -> pa.Table:
    names = ["user_id", "gender", "age", "occupation", "zip"]
    table = read_delimited(
        path, delimiter="::", column_names=names, types=dict.fromkeys(names, pa.string()), checks={"user_id": "present"}
    )
    require_rows(table, path)
    require_unique(table, "user_id", path)
    return table


def read_movies(path: Path) -> pa.Table:
    names = ["item_id", "title", "genres"]
    table = read_delimited(
        path,
        delimiter="::",
        column_names=names,
        types=dict.fromkeys(names, pa.string()),
        checks={"item_id": "present"},
        encoding="latin-1",
    )
    require_rows(table, path)
    require_unique(table, "item_id", path)
    matches = pc.extract_regex(table["title"], _YEAR)  # struct<year: string>, null where the title has no "(YYYY)"
    return table.append_column("year", pc.struct_field(matches, "year").cast(pa.int32()))


def read_ratings(path: Path) -> pa.Table:
    names = ["user_id", "item_id", "rating", "timestamp"]
    table = read_delimited(
        path,
        delimiter="::",
        column_names=names,
        types={"user_id": pa.string(), "item_id": pa.string(), "rating": pa.float64(), "timestamp": pa.int64()},
        checks={"user_id": "present", "item_id": "present", "timestamp": "int"},
    )
    require_rows(table, path)
    return interactions_table(table["user_id"], table["item_id"], table["timestamp"])


def read_ncf_train(path: Path) -> pa.Table:
    table = _read_tsv(path, {"user_id": "present", "movie_id": "present"})
    return interactions_table(table["user_id"], table["movie_id"], pa.array(np.zeros(table.num_rows, dtype=np.int64)))


def read_ncf_test(path: Path) -> pa.Table:
    table = _read_tsv(path, {"user_id": "present", "movie_id": "present", "timestamp": "int"})
    return interactions_table(table["user_id"], table["movie_id"], table["timestamp"])


def _read_tsv(path: Path, checks: dict) -> pa.Table:
    types = {"user_id": pa.string(), "movie_id": pa.string(), "rating": pa.float64(), "timestamp": pa.int64()}
    table = read_delimited(path, delimiter="\t", types=types, checks=checks)
    require_columns(table, path, list(checks))
    require_rows(table, path)
    return table
