"""Hard-negative sampling (DESIGN §5): same-category or exposed-not-clicked items, never the user's own items."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from models.errors import QuiverError
from training.hard_negatives import HardNegativeSampler, item_categories, read_exposures

# 10 items in 3 categories: 0 -> items 0-3, 1 -> items 4-7, 2 -> items 8-9; item 9's category is unknown.
CATEGORY = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, -1])
# user 0 saw items 0, 1, 4; user 1 saw item 8
SEEN = (np.array([0, 0, 0, 1]), np.array([0, 1, 4, 8]))


def test_category_pool_excludes_the_positive_and_everything_the_user_saw() -> None:
    s = HardNegativeSampler.by_category(CATEGORY, SEEN, 10, num_hard=5, seed=0)
    users, pos = np.array([0, 0, 1, 1, 0]), np.array([0, 4, 8, 9, 1])
    for _ in range(20):
        items, idx = s.sample(users, pos)
        rows, slots = idx[:, 0], idx[:, 1]
        by_row = {r: set(items[rows == r].tolist()) for r in range(5)}
        assert by_row[0] <= {2, 3}  # category 0 minus the positive 0 and seen item 1
        assert by_row[1] <= {5, 6, 7}  # category 1 minus seen item 4
        assert by_row[2] == set()  # category 2 holds only item 8, the positive (and seen)
        assert by_row[3] == set()  # unknown category: no pool
        assert by_row[4] <= {2, 3}
        for r in range(5):  # no repeats in a row, slots numbered 0.. within each row
            got = items[rows == r]
            assert len(got) == len(set(got.tolist())) <= 5
            assert sorted(slots[rows == r].tolist()) == list(range(len(got)))
    # With enough draws every eligible item shows up.
    assert set(s.sample(np.zeros(200, dtype=np.int64), np.full(200, 4))[0].tolist()) == {5, 6, 7}


def test_num_hard_caps_each_row() -> None:
    category = np.zeros(50, dtype=np.int64)
    s = HardNegativeSampler.by_category(category, (np.array([0]), np.array([0])), 50, num_hard=3, seed=1)
    items, idx = s.sample(np.array([0, 0]), np.array([0, 1]))
    assert np.bincount(idx[:, 0], minlength=2).tolist() == [3, 3]
    assert 0 not in items[idx[:, 0] == 0]


def test_exposure_pool_is_the_users_own_minus_clicks() -> None:
    # user 0 was shown 4, 5, 6 (clicked 4); user 1 was shown 2; user 2 nothing
    eu, ei = np.array([0, 0, 0, 1]), np.array([4, 5, 6, 2])
    s = HardNegativeSampler.by_exposures(eu, ei, 3, SEEN, 10, num_hard=4, seed=0)
    items, idx = s.sample(np.array([0, 1, 2]), np.array([0, 8, 3]))
    rows = idx[:, 0]
    assert set(items[rows == 0].tolist()) <= {5, 6} and len(items[rows == 0]) >= 1
    assert items[rows == 1].tolist() == [2]
    assert len(items[rows == 2]) == 0


def test_item_categories_codes_and_missing() -> None:
    items = pa.table({"item_id": ["a", "b", "c", "d"], "category": ["x", None, "y", "x"]})
    codes = item_categories(items, "category")
    assert codes[1] == -1 and codes[0] == codes[3] != codes[2] >= 0
    with pytest.raises(QuiverError, match="category_column"):
        item_categories(items, "genre")


def test_read_exposures_keeps_known_pairs(tmp_path: Path) -> None:
    path = tmp_path / "exposures.csv"
    path.write_text("user_id,item_id\nu1,i2\nu9,i1\nu2,i1\n")
    u, i = read_exposures(path, pa.array(["u1", "u2"]), pa.array(["i1", "i2"]))
    assert u.tolist() == [0, 1] and i.tolist() == [1, 0]
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item\nu1,i2\n")
    with pytest.raises(QuiverError, match="user_id"):
        read_exposures(bad, pa.array(["u1"]), pa.array(["i2"]))
