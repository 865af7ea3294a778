"""Readers for every format: small hand-written files, bad input, and the real shared data sets."""

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from models.errors import QuiverError
from training.data.config import DataConfig
from training.data.load import complete_catalog, load_data
from training.data.schema import INTERACTION_SCHEMA

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def _rows(table: pa.Table) -> list[tuple]:
    data = table.to_pydict()
    return list(zip(data["user_id"], data["item_id"], data["timestamp"], strict=True))


# ---------------------------------------------------------------- config


def test_config_rejects_unknown_format_and_keys() -> None:
    with pytest.raises(ValidationError):
        DataConfig(format="movielens", path="x")
    with pytest.raises(ValidationError):
        DataConfig(format="interactions", path="x", spilt="explicit")
    with pytest.raises(ValidationError):
        DataConfig(format="interactions", path="x", max_seq_len=0)


def test_config_explicit_split_needs_a_test_source() -> None:
    with pytest.raises(ValidationError, match=re.escape("data.test")):
        DataConfig(format="interactions", path="x", split="explicit")
    with pytest.raises(ValidationError, match=re.escape("data.test")):
        DataConfig(format="sequence_lines", path="x", test="t.txt")  # a test file without split: explicit
    DataConfig(format="ml1m", path="x", split="explicit")  # ML-1M's NCF test.tsv is found on disk


# ---------------------------------------------------------------- interactions


def test_interactions_csv_leave_last_out(tmp_path: Path) -> None:
    _write(
        tmp_path / "events.csv",
        "user_id,item_id,timestamp,extra\n1,10,100,a\n1,11,200,b\n1,12,300,c\n2,10,150,d\n2,13,50,e\n3,14,10,f\n",
    )
    data = load_data(DataConfig(format="interactions", path=str(tmp_path / "events.csv")))
    assert data.train.schema == INTERACTION_SCHEMA
    assert _rows(data.train) == [("1", "10", 100), ("2", "13", 50), ("3", "14", 10)]
    assert _rows(data.valid) == [("1", "11", 200)]
    assert _rows(data.test) == [("1", "12", 300), ("2", "10", 150)]
    assert data.train["weight"].to_pylist() == [1.0, 1.0, 1.0]
    assert data.items.to_pydict() == {"item_id": ["10", "13", "14", "11", "12"]}  # no item table: ids as seen
    assert data.users is None
    assert data.name == "events"


def test_interactions_parquet_with_tables_and_explicit_test(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"user_id": [1, 1, 1, 2], "item_id": [7, 8, 9, 7], "timestamp": [1, 2, 3, 1], "weight": [0.5] * 4}),
        tmp_path / "train.parquet",
    )
    pq.write_table(pa.table({"user_id": [1], "item_id": [99], "timestamp": [9]}), tmp_path / "test.parquet")
    _write(tmp_path / "users.tsv", "age\tuser_id\n30\t1\n40\t2\n")
    _write(tmp_path / "items.csv", "item_id,category,price\n7,a,1.5\n8,b,2.0\n")
    _write(tmp_path / "neg.tsv", "1\t50 51\n")
    cfg = DataConfig(
        format="interactions",
        path=str(tmp_path),
        train="train.parquet",
        test="test.parquet",
        users="users.tsv",
        items="items.csv",
        negatives="neg.tsv",
        split="explicit",
    )
    data = load_data(cfg)
    assert _rows(data.train) == [("1", "7", 1), ("1", "8", 2), ("2", "7", 1)]
    assert _rows(data.valid) == [("1", "9", 3)]  # user 1's latest training event; user 2 has only one
    assert _rows(data.test) == [("1", "99", 9)]
    assert data.train["weight"].to_pylist() == [0.5, 0.5, 0.5]
    assert data.users.column_names == ["user_id", "age"]  # id column moved first, cast to string
    assert data.users["user_id"].to_pylist() == ["1", "2"]
    # the catalog: the item table, then every other item seen anywhere, attributes null
    assert data.items.to_pydict() == {
        "item_id": ["7", "8", "9", "99", "50", "51"],
        "category": ["a", "b", None, None, None, None],
        "price": [1.5, 2.0, None, None, None, None],
    }
    assert data.test_negatives == {"1": ["50", "51"]}


def test_interactions_validation_none_keeps_all_training(tmp_path: Path) -> None:
    _write(tmp_path / "train.tsv", "user_id\titem_id\ttimestamp\n1\t1\t1\n1\t2\t2\n")
    _write(tmp_path / "test.tsv", "user_id\titem_id\ttimestamp\n1\t3\t3\n")
    cfg = DataConfig(
        format="interactions", path=str(tmp_path), train="train.tsv", test="test.tsv", split="explicit",
        validation="none",
    )  # fmt: skip
    data = load_data(cfg)
    assert data.valid is None and data.train.num_rows == 2


def test_interactions_missing_file(tmp_path: Path) -> None:
    with pytest.raises(QuiverError, match=re.escape("data.path not found")):
        load_data(DataConfig(format="interactions", path=str(tmp_path / "nope.csv")))
    _write(tmp_path / "train.csv", "user_id,item_id,timestamp\n1,1,1\n")
    cfg = DataConfig(format="interactions", path=str(tmp_path), train="train.csv", items="items.csv")
    with pytest.raises(QuiverError, match=re.escape(f"file not found: {tmp_path / 'items.csv'}")):
        load_data(cfg)


def test_interactions_wrong_field_count_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "e.csv", "user_id,item_id,timestamp\n1,1,1\n\n1,2\n")
    with pytest.raises(QuiverError, match=re.escape(f"{path}:4: expected 3 fields, found 2")):
        load_data(DataConfig(format="interactions", path=str(path)))


def test_interactions_non_integer_timestamp_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "e.tsv", "user_id\titem_id\ttimestamp\n1\t1\t1\n1\t2\t2.5\n")
    with pytest.raises(QuiverError, match=re.escape(f"{path}:3: column 'timestamp' has an invalid value '2.5'")):
        load_data(DataConfig(format="interactions", path=str(path)))
    path = _write(tmp_path / "f.csv", "user_id,item_id,timestamp\n1,1,\n")
    with pytest.raises(QuiverError, match=re.escape(f"{path}:2: column 'timestamp'")):
        load_data(DataConfig(format="interactions", path=str(path)))


def test_interactions_missing_column_and_empty_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "e.csv", "user_id,item,timestamp\n1,1,1\n")
    with pytest.raises(QuiverError, match=re.escape(f"{path}: missing column 'item_id'")):
        load_data(DataConfig(format="interactions", path=str(path)))
    path = _write(tmp_path / "header_only.csv", "user_id,item_id,timestamp\n")
    with pytest.raises(QuiverError, match=re.escape(f"{path}: empty data set")):
        load_data(DataConfig(format="interactions", path=str(path)))
    path = _write(tmp_path / "blank.csv", "")
    with pytest.raises(QuiverError, match=re.escape(f"{path}: empty")):
        load_data(DataConfig(format="interactions", path=str(path)))
    pq.write_table(pa.table({"user_id": ["1"], "timestamp": [1]}), tmp_path / "p.parquet")
    with pytest.raises(QuiverError, match=re.escape("p.parquet: missing column 'item_id'")):
        load_data(DataConfig(format="interactions", path=str(tmp_path / "p.parquet")))


def test_interactions_side_tables_need_their_id_column(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", "user_id,item_id,timestamp\n1,1,1\n")
    _write(tmp_path / "users.csv", "uid,age\n1,3\n")
    _write(tmp_path / "items.csv", "item_id,cat\n1,a\n1,b\n")
    cfg = DataConfig(format="interactions", path=str(tmp_path), train="train.csv", users="users.csv")
    with pytest.raises(QuiverError, match=re.escape("users.csv: missing column 'user_id'")):
        load_data(cfg)
    cfg = DataConfig(format="interactions", path=str(tmp_path), train="train.csv", items="items.csv")
    with pytest.raises(QuiverError, match=re.escape("items.csv: column 'item_id' must hold unique")):
        load_data(cfg)


def test_interactions_unknown_extension(tmp_path: Path) -> None:
    path = _write(tmp_path / "e.json", "{}")
    with pytest.raises(QuiverError, match=re.escape("unknown file type '.json'")):
        load_data(DataConfig(format="interactions", path=str(path)))


def test_complete_catalog_without_new_items_keeps_the_table() -> None:
    items = pa.table({"item_id": ["a", "b"], "x": [1, 2]})
    events = pa.table({"item_id": ["b"]})
    assert complete_catalog(items, [events, None], None) is items


# ---------------------------------------------------------------- sequence lines


def test_sequence_lines_positions_are_timestamps(tmp_path: Path) -> None:
    path = _write(tmp_path / "seq.txt", "u1 a b c d\nu2 b e\n\nu3 f\n")
    data = load_data(DataConfig(format="sequence_lines", path=str(path)))
    assert _rows(data.train) == [("u1", "a", 0), ("u1", "b", 1), ("u2", "b", 0), ("u3", "f", 0)]
    assert _rows(data.valid) == [("u1", "c", 2)]
    assert _rows(data.test) == [("u1", "d", 3), ("u2", "e", 1)]
    assert data.train.num_rows + data.valid.num_rows + data.test.num_rows == 7


def test_sequence_lines_explicit_test_file_comes_later(tmp_path: Path) -> None:
    _write(tmp_path / "train.txt", "0 1 2 3\n1 4\n")
    _write(tmp_path / "test.txt", "0 9 8\n2 7\n")
    cfg = DataConfig(format="sequence_lines", path=str(tmp_path), train="train.txt", test="test.txt", split="explicit")
    data = load_data(cfg)
    # user 0's train clock ends at 2: the test events continue at 3, 4; user 2 has no train events
    assert _rows(data.test) == [("0", "9", 3), ("0", "8", 4), ("2", "7", 0)]
    assert _rows(data.valid) == [("0", "3", 2)]
    assert set(data.items["item_id"].to_pylist()) == {"1", "2", "3", "4", "7", "8", "9"}


def test_sequence_lines_bad_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "seq.txt", "u1 a b\n\nu2\n")
    with pytest.raises(QuiverError, match=re.escape(f"{path}:3: expected a user id followed by at least one item")):
        load_data(DataConfig(format="sequence_lines", path=str(path)))
    path = _write(tmp_path / "dup.txt", "u1 a b\nu2 c\nu1 d\n")
    with pytest.raises(QuiverError, match=re.escape(f"{path}:3: user 'u1' already has a line")):
        load_data(DataConfig(format="sequence_lines", path=str(path)))
    path = _write(tmp_path / "empty.txt", "\n\n")
    with pytest.raises(QuiverError, match=re.escape(f"{path}: empty data set")):
        load_data(DataConfig(format="sequence_lines", path=str(path)))
    with pytest.raises(QuiverError, match=re.escape("file not found")):
        load_data(DataConfig(format="sequence_lines", path=str(tmp_path), train="missing.txt"))


def test_beauty_real_file() -> None:
    data = load_data(DataConfig(format="sequence_lines", path=str(SHARED / "amazon-beauty" / "Beauty.txt")))
    assert data.test.num_rows == 22_363 and data.valid.num_rows == 22_363  # 5-core: every user has >= 3 events
    assert data.train.num_rows + data.valid.num_rows + data.test.num_rows == 198_502
    assert data.items.num_rows == 12_101
    first = data.test.slice(0, 1).to_pylist()[0]
    assert first["user_id"] == "1" and first["item_id"] == "5" and first["timestamp"] == 4  # line 1: 1 1 2 3 4 5


# ---------------------------------------------------------------- ML-1M


def _ml1m_dir(tmp_path: Path) -> Path:
    _write(tmp_path / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    _write(
        tmp_path / "movies.dat",
        "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Misérables, Les (1995)::Drama\n3::No Year::Drama\n",
        encoding="latin-1",
    )
    return tmp_path


def test_ml1m_ratings_leave_last_out(tmp_path: Path) -> None:
    root = _ml1m_dir(tmp_path)
    _write(root / "ratings.dat", "1::1::5::300\n1::2::3::100\n1::4::4::200\n2::1::4::50\n")
    data = load_data(DataConfig(format="ml1m", path=str(root)))
    assert _rows(data.train) == [("1", "2", 100), ("2", "1", 50)]
    assert _rows(data.valid) == [("1", "4", 200)]
    assert _rows(data.test) == [("1", "1", 300)]
    assert data.users.to_pylist()[1] == {"user_id": "2", "gender": "M", "age": "56", "occupation": "16", "zip": "70072"}
    items = data.items.to_pydict()
    assert items["item_id"] == ["1", "2", "3", "4"]  # movie 4 is rated but missing from movies.dat
    assert items["title"][1] == "Misérables, Les (1995)"  # decoded from Latin-1
    assert items["genres"][0] == "Animation|Children's|Comedy"
    assert items["year"] == [1995, 1995, None, None]
    assert data.test_negatives is None


def test_ml1m_ncf_split(tmp_path: Path) -> None:
    root = _ml1m_dir(tmp_path)
    _write(root / "train.tsv", "user_id\tmovie_id\n1\t1\n1\t2\n2\t2\n")
    _write(root / "test.tsv", "user_id\tmovie_id\trating\ttimestamp\n1\t3\t5\t978824351\n2\t1\t3\t978300174\n")
    _write(root / "test_negatives.tsv", "user_id\tnegative_movie_ids(2, space-separated)\n1\t2 5\n2\t3 3\n")
    data = load_data(DataConfig(format="ml1m", path=str(root)))
    assert _rows(data.test) == [("1", "3", 978824351), ("2", "1", 978300174)]
    assert data.valid.num_rows == 1 and data.valid["user_id"].to_pylist() == ["1"]
    assert data.train.num_rows == 2 and set(data.train["timestamp"].to_pylist()) == {0}
    assert data.test_negatives == {"1": ["2", "5"], "2": ["3", "3"]}
    assert data.items["item_id"].to_pylist() == ["1", "2", "3", "5"]


def test_ml1m_bad_input(tmp_path: Path) -> None:
    root = _ml1m_dir(tmp_path)
    with pytest.raises(QuiverError, match=re.escape("ratings.dat")):
        load_data(DataConfig(format="ml1m", path=str(root)))  # neither train.tsv nor ratings.dat
    path = _write(root / "ratings.dat", "1::1::5::300\n1::2::3::soon\n")
    with pytest.raises(QuiverError, match=re.escape(f"{path}:2: column 'timestamp' has an invalid value 'soon'")):
        load_data(DataConfig(format="ml1m", path=str(root)))
    _write(root / "ratings.dat", "1::1::5::300\n1::2::3\n")
    with pytest.raises(QuiverError, match=re.escape(f"{path}:2: expected 4 fields, found 3")):
        load_data(DataConfig(format="ml1m", path=str(root)))
    path = _write(root / "train.tsv", "user_id\titem\n1\t1\n")
    _write(root / "test.tsv", "user_id\tmovie_id\trating\ttimestamp\n1\t3\t5\t9\n")
    with pytest.raises(QuiverError, match=re.escape(f"{path}: missing column 'movie_id'")):
        load_data(DataConfig(format="ml1m", path=str(root)))


def test_ml1m_real_ncf_split() -> None:
    data = load_data(DataConfig(format="ml1m", path=str(SHARED / "ml-1m")))
    assert data.train.num_rows + data.valid.num_rows == 994_169
    assert data.valid.num_rows == 6_040  # every user has many training ratings
    assert data.test.num_rows == 6_040
    assert len(data.test_negatives) == 6_040
    assert all(len(ids) == 99 for ids in data.test_negatives.values())
    assert data.items.num_rows >= 3_706 and data.users.num_rows == 6_040
    catalog = set(data.items["item_id"].to_pylist())
    for table in (data.train, data.valid, data.test):
        assert set(table["item_id"].to_pylist()) <= catalog
    assert {item for ids in data.test_negatives.values() for item in ids} <= catalog
    assert data.items.column_names == ["item_id", "title", "genres", "year"]


# ---------------------------------------------------------------- RecBole


def test_recbole_atomic_files(tmp_path: Path) -> None:
    _write(tmp_path / "toy.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\ta\t5\t10\n")
    with open(tmp_path / "toy.inter", "a") as handle:
        handle.write("1\tb\t3\t20.0\n1\tc\t4\t30\n2\ta\t1\t5\n")
    _write(tmp_path / "toy.item", "item_id:token\ttitle:token_seq\tprice:float\na\tBig Red Dog\t2.5\nb\tX\t\n")
    _write(tmp_path / "toy.user", "user_id:token\tage:token\n1\t24\n2\t53\n")
    data = load_data(DataConfig(format="recbole", path=str(tmp_path)))
    assert data.name == "toy"
    assert _rows(data.train) == [("1", "a", 10), ("2", "a", 5)]
    assert _rows(data.valid) == [("1", "b", 20)]
    assert _rows(data.test) == [("1", "c", 30)]
    assert data.train["weight"].to_pylist() == [1.0, 1.0]  # the rating is not a weight
    assert data.items.to_pydict() == {
        "item_id": ["a", "b", "c"],
        "title": ["Big Red Dog", "X", None],
        "price": [2.5, None, None],
    }
    assert data.users.to_pydict() == {"user_id": ["1", "2"], "age": ["24", "53"]}


def test_recbole_bad_input(tmp_path: Path) -> None:
    path = _write(tmp_path / "toy.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\ta\t10.5\n")
    with pytest.raises(QuiverError, match=re.escape(f"{path}:2: column 'timestamp' has an invalid value '10.5'")):
        load_data(DataConfig(format="recbole", path=str(tmp_path)))
    _write(path, "user_id:token\titem_id:token\tstamp:float\n1\ta\t10\n")
    with pytest.raises(QuiverError, match=re.escape(f"{path}: missing column 'timestamp'")):
        load_data(DataConfig(format="recbole", path=str(tmp_path)))
    _write(path, "user_id\titem_id:token\n")
    with pytest.raises(QuiverError, match=re.escape(f"{path}:1: header field 1 'user_id'")):
        load_data(DataConfig(format="recbole", path=str(tmp_path)))
    _write(path, "user_id:token\titem_id:token\ttimestamp:float\n1\ta\t10\n2\tb\n")
    with pytest.raises(QuiverError, match=re.escape(f"{path}:3: expected 3 fields, found 2")):
        load_data(DataConfig(format="recbole", path=str(tmp_path)))
    _write(path, "user_id:token\titem_id:token\ttimestamp:float\n1\ta\t10\n")
    _write(tmp_path / "toy.item", "name:token\tx:float\na\t1\n")
    with pytest.raises(QuiverError, match=re.escape("toy.item: missing column 'item_id'")):
        load_data(DataConfig(format="recbole", path=str(tmp_path)))
    with pytest.raises(QuiverError, match=re.escape("no <name>.inter files")):
        load_data(DataConfig(format="recbole", path=str(tmp_path / "..")))


def test_recbole_real_ml100k() -> None:
    data = load_data(DataConfig(format="recbole", path=str(SHARED / "ml-100k")))
    assert data.train.num_rows + data.valid.num_rows + data.test.num_rows == 100_000
    assert data.test.num_rows == 943 and data.valid.num_rows == 943
    assert data.users.num_rows == 943 and data.items.num_rows == 1_682
    assert data.items.column_names == ["item_id", "movie_title", "release_year", "class"]
    assert data.items.slice(0, 1).to_pylist()[0]["class"] == "Animation Children's Comedy"


# ---------------------------------------------------------------- Taobao


def test_taobao_behaviors_and_categories(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "ub.csv",
        "1,100,7,pv,10\n1,101,8,buy,20\n1,100,9,cart,30\n2,102,7,pv,15\n1,103,8,pv,40\n",
    )
    data = load_data(DataConfig(format="taobao", path=str(path)))
    assert _rows(data.test) == [("1", "103", 40)]
    assert _rows(data.valid) == [("1", "100", 30)]
    assert data.items.to_pydict() == {"item_id": ["100", "101", "102", "103"], "category": ["7", "8", "7", "8"]}
    data = load_data(DataConfig(format="taobao", path=str(path), behaviors=["buy", "cart"]))
    assert _rows(data.train) == [("1", "101", 20)]
    assert _rows(data.test) == [("1", "100", 30)]
    assert data.items.to_pydict() == {"item_id": ["101", "100"], "category": ["8", "9"]}


def test_taobao_bad_input(tmp_path: Path) -> None:
    path = _write(tmp_path / "ub.csv", "1,100,7,pv,10\n1,101,8,buy\n")
    with pytest.raises(QuiverError, match=re.escape(f"{path}:2: expected 5 fields, found 4")):
        load_data(DataConfig(format="taobao", path=str(path)))
    path = _write(tmp_path / "ub.csv", "1,100,7,pv,10\n1,101,8,buy,x\n")
    with pytest.raises(QuiverError, match=re.escape(f"{path}:2: column 'timestamp'")):
        load_data(DataConfig(format="taobao", path=str(path)))
    path = _write(tmp_path / "ub.csv", "1,100,7,pv,10\n")
    with pytest.raises(QuiverError, match=re.escape(f"{path}: empty data set: no rows with behavior in")):
        load_data(DataConfig(format="taobao", path=str(path), behaviors=["buy"]))
    with pytest.raises(ValidationError, match=re.escape("data.behaviors")):
        DataConfig(format="interactions", path=str(path), behaviors=["buy"])


def test_taobao_real_sample() -> None:
    path = SHARED / "taobao-sample" / "UserBehavior_first4321rows.csv"
    data = load_data(DataConfig(format="taobao", path=str(path)))
    assert data.train.num_rows + data.valid.num_rows + data.test.num_rows == 4_321
    assert data.items.column_names == ["item_id", "category"]
    assert data.items["category"].null_count == 0
    buys = load_data(DataConfig(format="taobao", path=str(path), behaviors=["buy"]))
    assert 0 < buys.train.num_rows + buys.test.num_rows + buys.valid.num_rows < 4_321


def test_interactions_parquet_timestamps_and_bad_text(tmp_path: Path) -> None:
    stamps = pa.array([1_700_000_000_000, 1_700_000_005_000], type=pa.timestamp("ms"))
    pq.write_table(pa.table({"user_id": ["u", "u"], "item_id": ["a", "b"], "timestamp": stamps}), tmp_path / "t.pq")
    data = load_data(DataConfig(format="interactions", path=str(tmp_path / "t.pq")))
    assert _rows(data.train) == [("u", "a", 1_700_000_000)] and _rows(data.test) == [("u", "b", 1_700_000_005)]
    path = tmp_path / "bad.csv"
    path.write_bytes(b"user_id,item_id,timestamp\n1,\xff\xfe,3\n")
    with pytest.raises(QuiverError, match=re.escape(f"{path}: not valid utf-8 text")):
        load_data(DataConfig(format="interactions", path=str(path)))
