import numpy as np
import pyarrow as pa

from training.data.schema import interactions_table
from training.data.split import (
    TEST,
    TRAIN,
    VALID,
    carve_validation,
    last_event_mask,
    leave_last_out_roles,
    rank_from_end,
    split_leave_last_out,
)


def _table(rows: list[tuple[str, str, int]]) -> pa.Table:
    users, items, times = zip(*rows, strict=True)
    return interactions_table(pa.array(users), pa.array(items), pa.array(times, type=pa.int64()))


def test_rank_from_end_counts_from_the_latest_event() -> None:
    users = np.array([0, 0, 1, 0, 1])
    times = np.array([5, 1, 7, 3, 2])
    rank, count = rank_from_end(users, times, np.arange(5))
    # user 0: times 5, 1, 3 -> ranks 0, 2, 1; user 1: times 7, 2 -> ranks 0, 1
    assert rank.tolist() == [0, 2, 0, 1, 1]
    assert count.tolist() == [3, 3, 2, 3, 2]


def test_leave_last_out_roles_by_event_count() -> None:
    # user 0 has one event, user 1 two, user 2 four (rows deliberately out of time order)
    users = np.array([0, 1, 1, 2, 2, 2, 2])
    times = np.array([10, 20, 10, 40, 10, 30, 20])
    roles = leave_last_out_roles(users, times)
    assert roles.tolist() == [TRAIN, TEST, TRAIN, TEST, TRAIN, VALID, TRAIN]


def test_leave_last_out_breaks_ties_by_row_order() -> None:
    users = np.zeros(4, dtype=np.int64)
    times = np.array([1, 9, 9, 9])
    # three events share the latest time: the last row is test, the one before it valid
    assert leave_last_out_roles(users, times).tolist() == [TRAIN, TRAIN, VALID, TEST]


def test_split_leave_last_out_tables_partition_the_rows() -> None:
    table = _table([("a", "x", 1), ("b", "y", 5), ("a", "z", 3), ("a", "w", 2), ("b", "v", 4), ("c", "u", 1)])
    train, valid, test = split_leave_last_out(table)
    assert test.to_pydict()["item_id"] == ["y", "z"]  # a's latest is z (t=3), b's is y (t=5)
    assert valid.to_pydict()["item_id"] == ["w"]  # only a has 3 events
    assert train.to_pydict()["item_id"] == ["x", "v", "u"]  # c's single event stays in train
    assert train.num_rows + valid.num_rows + test.num_rows == table.num_rows
    assert train.schema == table.schema


def test_carve_validation_holds_out_latest_for_users_with_two_or_more() -> None:
    table = _table([("a", "x", 1), ("a", "y", 3), ("a", "z", 2), ("b", "v", 4)])
    train, valid = carve_validation(table, seed=0)
    assert valid.to_pydict() == {"user_id": ["a"], "item_id": ["y"], "timestamp": [3], "weight": [1.0]}
    assert sorted(train["item_id"].to_pylist()) == ["v", "x", "z"]


def test_validation_ties_are_random_but_seeded() -> None:
    # 200 users with 5 events all at time 0 (ML-1M NCF train): the held-out event is a seeded random one
    users = np.repeat(np.arange(200), 5)
    times = np.zeros(1000, dtype=np.int64)
    first = last_event_mask(users, times, seed=1)
    assert first.sum() == 200
    assert np.array_equal(first, last_event_mask(users, times, seed=1))
    assert not np.array_equal(first, last_event_mask(users, times, seed=2))
    picked_slot = np.flatnonzero(first) % 5
    assert len(set(picked_slot.tolist())) == 5  # not always the first or last row


def test_last_event_mask_skips_single_event_users() -> None:
    users = np.array([0, 1, 1])
    times = np.array([5, 1, 2])
    assert last_event_mask(users, times, seed=0).tolist() == [False, False, True]
