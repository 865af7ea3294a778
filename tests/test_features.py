"""Feature schema validation and the encoders: vocabularies, hash buckets, dense statistics, multi-valued cells."""

import hashlib
import re

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from models.errors import QuiverError
from models.features import (
    OOV,
    PAD,
    DenseStats,
    FeatureConfig,
    FeatureEncoder,
    FeatureGroups,
    HashBuckets,
    Vocab,
    encoding_from_json,
    pad_ragged,
    split_multi,
)


def _f(name: str, kind: str, **kw: object) -> FeatureConfig:
    return FeatureConfig(name=name, kind=kind, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- Vocab


def test_vocab_orders_by_frequency_then_token_with_pad_and_oov_reserved() -> None:
    # counts: c=3, a=2, b=2, d=1 -> c first, then the a/b tie broken by token, then d
    vocab = Vocab.build(pa.array(["b", "c", "a", "c", "d", "a", "b", "c"]))
    assert vocab.tokens == ["c", "a", "b", "d"]
    assert len(vocab) == 6  # 4 tokens + pad + OOV
    codes = vocab.lookup(pa.array(["c", "a", "b", "d", "zzz"]))
    assert codes.dtype == np.int64
    assert codes.tolist() == [2, 3, 4, 5, OOV]
    assert PAD == 0 and OOV == 1


def test_vocab_min_count_drops_rare_values_to_oov() -> None:
    # counts: x=3, y=2, z=1; min_count=2 keeps x and y only
    vocab = Vocab.build(pa.array(["x", "y", "x", "z", "y", "x"]), min_count=2)
    assert vocab.tokens == ["x", "y"]
    assert vocab.lookup(pa.array(["x", "y", "z"])).tolist() == [2, 3, OOV]


def test_vocab_nulls_are_not_counted_and_look_up_as_oov() -> None:
    vocab = Vocab.build(pa.array(["a", None, None, None, "b", "a"]))
    assert vocab.tokens == ["a", "b"]  # three nulls would otherwise be the most frequent value
    assert vocab.lookup(pa.array([None, "a", None], pa.string())).tolist() == [OOV, 2, OOV]


def test_vocab_lookup_accepts_chunked_arrays() -> None:
    vocab = Vocab(["p", "q"])
    chunked = pa.chunked_array([pa.array(["q", None]), pa.array(["p", "r"])])
    assert vocab.lookup(chunked).tolist() == [3, OOV, 2, OOV]


def test_vocab_json_round_trip_gives_identical_lookups() -> None:
    vocab = Vocab.build(pa.array(["é", "b", "é", "a", "b", "é", "naïve"]))
    back = encoding_from_json(vocab.to_json())
    assert isinstance(back, Vocab)
    assert back.tokens == vocab.tokens == ["é", "b", "a", "naïve"]
    probe = pa.array(["a", "b", "é", "naïve", "unseen", None])
    np.testing.assert_array_equal(back.lookup(probe), vocab.lookup(probe))
    assert back.lookup(probe).tolist() == [4, 3, 2, 5, OOV, OOV]


def test_encoding_from_json_rejects_unknown_kinds() -> None:
    with pytest.raises(QuiverError, match="bogus"):
        encoding_from_json('{"kind": "bogus"}')


def test_vocab_on_an_integer_column_looks_up_its_own_values() -> None:
    # BUG: Vocab.build keeps the tokens of an int column as Python ints, and Vocab.lookup then builds
    # pa.array(tokens, pa.string()) -> pyarrow.ArrowTypeError "Expected bytes, got a 'int' object". An `id` feature on
    # any integer attribute (ML-1M movies.year is int32, numeric profile columns of RecBole/interactions tables)
    # crashes FeatureEncoder.encode_table during training; after a JSON round trip the tokens are str and it works.
    vocab = Vocab.build(pa.array([1995, 1995, 2000], pa.int32()))
    assert vocab.lookup(pa.array([1995, 2000, 1970], pa.int32())).tolist() == [2, 3, OOV]


# ---------------------------------------------------------------- HashBuckets


def test_hash_buckets_are_stable_in_range_and_nulls_are_oov() -> None:
    buckets = HashBuckets(num_buckets=7)
    values = pa.array(["apple", "pear", "apple", None, "plum"])
    codes = buckets.lookup(values)

    def expected(v: str) -> int:  # blake2b-64, little-endian, mod buckets, + 2 reserved rows
        return int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little") % 7 + 2

    assert codes.tolist() == [expected("apple"), expected("pear"), expected("apple"), OOV, expected("plum")]
    assert codes[0] == codes[2]  # same value, same bucket
    known = codes[[0, 1, 2, 4]]
    assert known.min() >= 2 and known.max() < 7 + 2
    assert len(buckets) == 9
    # same answer from a chunked column and after a JSON round trip
    chunked = pa.chunked_array([values.slice(0, 2), values.slice(2)])
    np.testing.assert_array_equal(buckets.lookup(chunked), codes)
    back = encoding_from_json(buckets.to_json())
    np.testing.assert_array_equal(back.lookup(values), codes)  # type: ignore[union-attr]


def test_hash_buckets_spread_many_values_over_every_bucket() -> None:
    codes = HashBuckets(num_buckets=4).lookup(pa.array([f"id{i}" for i in range(400)]))
    assert set(codes.tolist()) == {2, 3, 4, 5}


# ---------------------------------------------------------------- DenseStats


def test_dense_stats_standardise_by_hand_and_nulls_become_zero() -> None:
    # values 1, 2, 3, 6 (null ignored): mean 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5, std sqrt(3.5)
    stats = DenseStats.fit(pa.array([1.0, 2.0, None, 3.0, 6.0]))
    assert stats.mean == pytest.approx(3.0)
    assert stats.std == pytest.approx(np.sqrt(3.5))
    out = stats.transform(pa.array([1.0, None, 6.0, 3.0]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-2 / np.sqrt(3.5), 0.0, 3 / np.sqrt(3.5), 0.0], rtol=1e-6)
    back = encoding_from_json(stats.to_json())
    assert back == stats


def test_dense_stats_constant_or_empty_columns_do_not_divide_by_zero() -> None:
    assert DenseStats.fit(pa.array([4, 4, 4])) == DenseStats(4.0, 1.0)
    assert DenseStats.fit(pa.array([None, None], pa.float64())) == DenseStats(0.0, 1.0)
    assert DenseStats(4.0, 1.0).transform(pa.array([5], pa.int64())).tolist() == [1.0]


# ---------------------------------------------------------------- multi_id


def test_split_multi_truncates_to_max_len() -> None:
    flat, lengths = split_multi(pa.array(["a|b|c", "d", "e|f|g|h"]), "|", 3)
    assert flat.to_pylist() == ["a", "b", "c", "d", "e", "f", "g"]  # h is past max_len
    assert lengths.tolist() == [3, 1, 3]


def test_pad_ragged_zero_pads_each_row_at_the_end() -> None:
    out = pad_ragged(np.array([5, 6, 7, 8, 9, 10]), np.array([3, 1, 0, 2]), 4)
    assert out.dtype == np.int64
    assert out.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0], [9, 10, 0, 0]]


def test_multi_id_codes_through_vocab() -> None:
    cells = pa.array(["a|b|c", "c", "b|zzz|a|c"])
    vocab = Vocab.build(split_multi(cells, "|", 2)[0])  # counted values: a, b, c, b, zzz -> b=2, a, c, zzz
    assert vocab.tokens == ["b", "a", "c", "zzz"]
    flat, lengths = split_multi(pa.array(["a|b|c", "q", "c|b"]), "|", 2)
    codes = pad_ragged(vocab.lookup(flat), lengths, 2)
    assert codes.tolist() == [[3, 2], [OOV, 0], [4, 2]]


def test_multi_id_null_cells_never_get_a_vocabulary_row() -> None:
    # BUG: split_multi fills null cells with "" and splits them into [""], so Vocab.build counts "" as a real token
    # (here the most frequent one, index 2) and a null cell encodes as that known value instead of OOV/padding.
    # Catalog completion adds all-null item rows, so this happens in ordinary training data.
    cells = pa.array(["a|b", None, None, "a"])
    vocab = Vocab.build(split_multi(cells, "|", 3)[0])
    assert "" not in vocab.tokens
    flat, lengths = split_multi(pa.array([None, "a"], pa.string()), "|", 3)
    codes = pad_ragged(vocab.lookup(flat), lengths, 3)
    assert set(codes[0].tolist()) <= {PAD, OOV}


# ---------------------------------------------------------------- FeatureGroups validation

ITEM = [_f("item_id", "id")]
USER = [_f("user_id", "id")]


def test_duplicate_feature_names_are_named() -> None:
    with pytest.raises(ValidationError, match=re.escape("repeated: ['item_id']")):
        FeatureGroups(user=[*USER, _f("item_id", "id")], item=ITEM)


def test_sequence_feature_outside_hist_is_named() -> None:
    with pytest.raises(ValidationError, match=re.escape("features.user.recent")):
        FeatureGroups(user=[*USER, _f("recent", "sequence", shared_with="item_id")], item=ITEM)
    with pytest.raises(ValidationError, match=re.escape("features.hist.age")):
        FeatureGroups(user=USER, item=ITEM, hist=[_f("age", "id")])


def test_shared_with_must_name_an_existing_id_feature() -> None:
    with pytest.raises(ValidationError, match=re.escape("features.hist_items.shared_with: 'nope'")):
        FeatureGroups(user=USER, item=ITEM, hist=[_f("hist_items", "sequence", shared_with="nope")])
    dense = [*ITEM, _f("price", "dense")]
    with pytest.raises(
        ValidationError, match=re.escape("features.hist_items.shared_with: 'price' is not an id feature")
    ):
        FeatureGroups(user=USER, item=dense, hist=[_f("hist_items", "sequence", shared_with="price")])


def test_shared_table_needs_the_same_embedding_dim() -> None:
    item = [_f("item_id", "id", embedding_dim=32)]
    with pytest.raises(
        ValidationError, match=re.escape("features.hist_items.embedding_dim must equal that of 'item_id'")
    ):
        FeatureGroups(user=USER, item=item, hist=[_f("hist_items", "sequence", shared_with="item_id")])


def test_hash_feature_needs_num_buckets() -> None:
    with pytest.raises(ValidationError, match="feature brand: kind 'hash' needs num_buckets"):
        _f("brand", "hash")
    with pytest.raises(ValidationError, match="feature brand: num_buckets is only for kind 'hash'"):
        _f("brand", "id", num_buckets=4)


def test_unknown_feature_option_and_missing_item_group_are_rejected() -> None:
    with pytest.raises(ValidationError, match="embeding_dim"):
        FeatureConfig.model_validate({"name": "x", "kind": "id", "embeding_dim": 4})
    with pytest.raises(ValidationError, match="item"):
        FeatureGroups.model_validate({"user": [{"name": "user_id", "kind": "id"}], "item": []})
    with pytest.raises(ValidationError, match="needs at least one user or hist feature"):
        FeatureGroups(item=ITEM)


def test_dense_feature_cannot_share_an_id_table() -> None:
    # BUG: FeatureGroups accepts `shared_with` on a dense feature. The encoder then looks the float column up in the
    # other feature's vocabulary (every price becomes OOV = 1) and the model feeds that code in as the "standardised"
    # value: silent garbage instead of a config error.
    with pytest.raises(ValidationError, match="price"):
        FeatureGroups(user=USER, item=[*ITEM, _f("price", "dense", shared_with="item_id")])


def test_multi_id_shared_with_a_hash_feature_is_rejected_or_encoded() -> None:
    # BUG: validation lets a multi_id feature share a hash feature's table, but encode_table asserts the encoding is
    # a Vocab and dies with a bare AssertionError. Either outcome below (a config error naming the feature, or
    # hashed codes) would be fine.
    try:
        groups = FeatureGroups(
            user=USER,
            item=[*ITEM, _f("brand", "hash", num_buckets=5), _f("tags", "multi_id", shared_with="brand", max_len=2)],
        )
    except ValidationError as err:
        assert "tags" in str(err)
        return
    items = pa.table({"item_id": ["i1", "i2"], "brand": ["x", "y"], "tags": ["p|q", "r"]})
    train = pa.table({"user_id": ["u1"], "item_id": ["i1"]})
    enc = FeatureEncoder.fit(groups, train, pa.table({"user_id": ["u1"]}), items)
    codes = enc.encode_table("item", items, 2)["tags"]
    assert codes.shape == (2, 2) and codes[1, 1] == PAD and codes[0].min() >= 2


# ---------------------------------------------------------------- FeatureEncoder


def _groups() -> FeatureGroups:
    return FeatureGroups(
        user=[_f("user_id", "id", embedding_dim=4), _f("gender", "id", embedding_dim=2), _f("age", "dense")],
        item=[
            _f("item_id", "id", embedding_dim=4),
            _f("cat", "id", column="category", embedding_dim=3, min_count=2),
            _f("genres", "multi_id", embedding_dim=3, max_len=2),
            _f("brand", "hash", num_buckets=3, embedding_dim=2),
            _f("price", "dense"),
        ],
        hist=[_f("hist_item_id", "sequence", shared_with="item_id", embedding_dim=4)],
    )


def _tables() -> tuple[pa.Table, pa.Table, pa.Table]:
    train = pa.table({"user_id": ["u1", "u2", "u1", "u3", "u2", "u1"], "item_id": ["i2", "i2", "i1", "i2", "i3", "i3"]})
    users = pa.table({"user_id": ["u3", "u1", "u2"], "gender": ["F", "M", "F"], "age": [20.0, 30.0, None]})
    items = pa.table(
        {
            "item_id": ["i1", "i2", "i3", "i4"],
            "category": ["x", "y", "x", "z"],
            "genres": ["a|b", "b", "b|c|a", None],
            "brand": ["k", "k", "m", None],
            "price": [1.0, 3.0, None, 5.0],
        }
    )
    return train, users, items


def test_encoder_fit_counts_events_for_ids_and_rows_for_attributes() -> None:
    train, users, items = _tables()
    enc = FeatureEncoder.fit(_groups(), train, users, items)
    # item_id counts training events: i2 x3, i3 x2, i1 x1 (i4 never seen)
    assert enc.encodings["item_id"] == Vocab(["i2", "i3", "i1"])
    # user_id counts events too: u1 x3, u2 x2, u3 x1 (not the profile table order u3, u1, u2)
    assert enc.encodings["user_id"] == Vocab(["u1", "u2", "u3"])
    # category counts item rows: x x2, y and z once -> min_count 2 keeps x only
    assert enc.encodings["cat"] == Vocab(["x"])
    assert enc.encodings["gender"] == Vocab(["F", "M"])
    assert enc.encodings["brand"] == HashBuckets(3)
    price = enc.encodings["price"]
    assert isinstance(price, DenseStats)
    assert price.mean == pytest.approx(3.0) and price.std == pytest.approx(np.sqrt(8 / 3))  # (1, 3, 5): var 8/3
    assert "hist_item_id" not in enc.encodings  # it shares item_id's vocabulary
    sizes = enc.table_sizes()
    assert "price" not in sizes and "age" not in sizes  # dense features own no table
    assert {k: v for k, v in sizes.items() if k != "genres"} == {
        "item_id": 5,
        "user_id": 5,
        "cat": 3,
        "gender": 4,
        "brand": 5,
    }
    assert sizes["genres"] == len(enc.encodings["genres"])


def test_encoder_encode_table_shapes_and_codes() -> None:
    train, users, items = _tables()
    groups = _groups()
    enc = FeatureEncoder.fit(groups, train, users, items)
    item_feats = enc.encode_table("item", items, 4)
    assert item_feats["item_id"].tolist() == [4, 2, 3, OOV]
    assert item_feats["cat"].tolist() == [2, OOV, 2, OOV]
    genres = enc.encodings["genres"]
    assert isinstance(genres, Vocab)
    g = {t: i + 2 for i, t in enumerate(genres.tokens)}
    assert item_feats["genres"].shape == (4, 2)
    assert item_feats["genres"][:3].tolist() == [[g["a"], g["b"]], [g["b"], 0], [g["b"], g["c"]]]  # max_len 2
    brand = item_feats["brand"]
    assert brand[0] == brand[1] and brand[3] == OOV and 2 <= brand[2] < 5
    price = item_feats["price"]
    assert price.dtype == np.float32 and price[2] == 0.0 and price[0] == pytest.approx(-2 / np.sqrt(8 / 3))
    user_feats = enc.encode_table("user", users, 3)
    assert user_feats["user_id"].tolist() == [4, 2, 3]
    assert user_feats["gender"].tolist() == [2, 3, 2]
    assert user_feats["age"].tolist() == pytest.approx([-1.0, 1.0, 0.0])  # mean 25, std 5, null -> 0
    hist = groups.hist[0]
    assert enc.encode_item_ids(hist, pa.array(["i1", "i9", "i2"])).tolist() == [4, OOV, 2]


def test_encoder_names_a_missing_column_and_a_row_count_mismatch() -> None:
    train, users, items = _tables()
    with pytest.raises(QuiverError, match=re.escape("features.item.cat: column 'category' not found")):
        FeatureEncoder.fit(_groups(), train, users, items.drop_columns(["category"]))
    enc = FeatureEncoder.fit(_groups(), train, users, items)
    with pytest.raises(QuiverError, match=re.escape("features.user.user_id: 3 values for 5 rows")):
        enc.encode_table("user", users, 5)
    with pytest.raises(QuiverError, match=re.escape("features.user.user_id: column 'user_id' not found (no table)")):
        enc.encode_table("user", None, 3)


def test_encoder_files_round_trip() -> None:
    train, users, items = _tables()
    groups = _groups()
    enc = FeatureEncoder.fit(groups, train, users, items)
    files = enc.to_files()
    assert sorted(files) == [
        f"vocab/{n}.json" for n in sorted(["age", "brand", "cat", "gender", "genres", "item_id", "price", "user_id"])
    ]
    back = FeatureEncoder.from_files(groups, files)
    assert back.encodings == enc.encodings
    assert back.table_sizes() == enc.table_sizes()
    for group, table, n in (("item", items, 4), ("user", users, 3)):
        a, b = enc.encode_table(group, table, n), back.encode_table(group, table, n)  # type: ignore[arg-type]
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    del files["vocab/cat.json"]
    with pytest.raises(QuiverError, match=re.escape("vocab/cat.json")):
        FeatureEncoder.from_files(groups, files)


def test_small_and_large_vocab_lookups_agree() -> None:
    """Serving-size lookups (a cached dict) and column lookups (Arrow's hash join) give the same codes."""
    from models.features import SMALL_LOOKUP, Vocab

    vocab = Vocab.build(pa.array(["b", "a", "b", "c", "7"]))
    small = pa.array(["a", None, "zz", "b", "7", "c"])
    big = pa.array((small.to_pylist() * (SMALL_LOOKUP // 6 + 2))[: SMALL_LOOKUP + 5])
    assert vocab.lookup(small).tolist() == [4, 1, 1, 2, 3, 5]  # b most frequent; ties by token: 7 < a < c
    assert vocab.lookup(big).tolist() == (vocab.lookup(small).tolist() * (SMALL_LOOKUP // 6 + 2))[: SMALL_LOOKUP + 5]
    assert vocab.lookup(pa.array([7, None], pa.int64())).tolist() == [3, 1]  # non-string ids cast like a column


def test_small_and_large_hash_lookups_agree() -> None:
    """A request's history (hashed value by value) and a column (dictionary-encoded first) get the same buckets."""
    from models.features import SMALL_LOOKUP

    buckets = HashBuckets(num_buckets=11)
    small = pa.array(["a", None, "zz", "a", "7"])
    reps = SMALL_LOOKUP // len(small) + 2
    big = pa.array((small.to_pylist() * reps)[: SMALL_LOOKUP + 3])
    codes = buckets.lookup(small).tolist()
    assert codes[1] == OOV and codes[0] == codes[3] and min(codes[:1] + codes[2:]) >= 2
    assert buckets.lookup(big).tolist() == (codes * reps)[: SMALL_LOOKUP + 3]
    assert buckets.lookup(pa.array([7, None], pa.int64())).tolist() == [codes[4], OOV]  # ids cast to strings first
