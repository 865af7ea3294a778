import numpy as np
import pytest

from training.data.history import OtherEvents, build_histories
from training.examples import history_now


def test_hand_example_with_ties_and_truncation() -> None:
    # user 1: items 11@1, 12@2, 13@2 (tie), 14@3, 15@4; user 2: 21@5, 22@6. Rows shuffled.
    users = np.array([1, 2, 1, 1, 2, 1, 1])
    times = np.array([4, 6, 2, 1, 5, 3, 2])
    items = np.array([15, 22, 12, 11, 21, 14, 13])
    hist, lengths = build_histories(users, times, items, max_len=3)
    expected = [
        [12, 13, 14],  # 15@4 sees 11, 12, 13, 14: the 3 most recent, oldest first
        [21, 0, 0],  # 22@6
        [11, 0, 0],  # 12@2 must not see 13@2 (same time)
        [0, 0, 0],  # 11@1 is the user's first event
        [0, 0, 0],  # 21@5
        [11, 12, 13],  # 14@3 sees both tied events, in row order
        [11, 0, 0],  # 13@2 must not see 12@2
    ]
    assert hist.tolist() == expected
    assert lengths.tolist() == [3, 1, 1, 0, 0, 3, 1]
    assert hist.dtype == np.int64 and lengths.dtype == np.int64


def test_matches_a_brute_force_definition() -> None:
    rng = np.random.default_rng(3)
    n = 400
    users = rng.integers(0, 7, n)
    times = rng.integers(0, 30, n)
    items = rng.integers(1, 100, n)
    hist, lengths = build_histories(users, times, items, max_len=5)
    for i in range(n):
        earlier = [j for j in range(n) if users[j] == users[i] and times[j] < times[i]]
        earlier.sort(key=lambda j: (times[j], j))
        want = [int(items[j]) for j in earlier[-5:]]
        assert lengths[i] == len(want)
        assert hist[i].tolist() == want + [0] * (5 - len(want))


def test_test_rows_see_train_and_valid_but_not_later_events() -> None:
    # train (t=1,2), valid (t=3), test (t=4) of one user, concatenated as callers do
    users = np.array([0, 0, 0, 0])
    times = np.array([1, 2, 3, 4])
    items = np.array([5, 6, 7, 8])
    hist, lengths = build_histories(users, times, items, max_len=4)
    assert hist[3].tolist() == [5, 6, 7, 0] and lengths[3] == 3
    assert hist[2].tolist() == [5, 6, 0, 0]


def test_empty_input_and_bad_arguments() -> None:
    empty = np.zeros(0, dtype=np.int64)
    hist, lengths = build_histories(empty, empty, empty, max_len=4)
    assert hist.shape == (0, 4) and lengths.shape == (0,)
    with pytest.raises(ValueError):
        build_histories(empty, empty, empty, max_len=0)
    with pytest.raises(ValueError):
        build_histories(np.zeros(2), np.zeros(3), np.zeros(2), max_len=2)


def test_a_million_rows_at_ml1m_scale() -> None:
    rng = np.random.default_rng(0)
    n = 1_000_000
    users = rng.integers(0, 6000, n)
    times = rng.integers(0, 10**9, n)
    items = rng.integers(1, 4000, n)
    hist, lengths = build_histories(users, times, items, max_len=50)
    assert hist.shape == (n, 50)
    assert lengths.max() == 50 and lengths.min() == 0
    # ~167 events per user: every length 0..50 occurs; check a short history against its definition
    i = int(np.argmax(lengths == 7))
    mine = np.flatnonzero((users == users[i]) & (times < times[i]))
    assert sorted(hist[i, :7].tolist()) == sorted(items[mine].tolist())


def test_other_events_never_include_the_event_itself() -> None:
    # user 0: items 10, 11, 12 (rows 0, 2, 4); user 1: item 20 only (row 1); user 2: items 30..39 (rows 3, 5..13)
    users = np.array([0, 1, 0, 2, 0] + [2] * 9)
    items = np.array([10, 20, 11, 30, 12, *range(31, 40)])
    others = OtherEvents(users, items, max_len=4, seed=0)
    hist = others.sample(np.array([2, 1, 0]))
    assert hist.shape == (3, 4)
    assert sorted(hist[0, :2].tolist()) == [10, 12] and hist[0, 2:].tolist() == [0, 0]  # all others, once each
    assert hist[1].tolist() == [0, 0, 0, 0]  # a user's only event has no history
    assert sorted(hist[2, :2].tolist()) == [11, 12]
    # a large user (10 events > max_len): 4 random others, never the event itself, fresh at every call
    seen: set[int] = set()
    for _ in range(50):
        row = others.sample(np.array([3]))[0]
        assert 30 not in row and set(row.tolist()) <= set(range(31, 40))
        seen |= set(row.tolist())
    assert seen == set(range(31, 40))


def test_shuffled_query_history_is_a_subset_of_seen_items() -> None:
    # unordered data (all timestamps 0): a query sees `length` of the user's seen items, none of anyone else's
    su = np.array([0, 0, 0, 0, 0, 1, 1])
    si = np.array([0, 1, 2, 3, 4, 5, 6])  # catalog rows
    st = np.zeros(7, dtype=np.int64)
    hist = history_now((su, st, si), np.array([0, 1]), length=3, shuffle=True)
    assert hist.shape == (2, 3)
    assert len(set(hist[0].tolist())) == 3 and set(hist[0].tolist()) <= {1, 2, 3, 4, 5}  # row + 1
    assert sorted(hist[1, :2].tolist()) == [6, 7] and hist[1, 2] == 0


def test_query_history_matches_build_histories_at_the_end_of_time() -> None:
    # history_now is the query-only shortcut of: append one row per query user at the end of time, build_histories
    rng = np.random.default_rng(1)
    su = rng.integers(0, 30, 2000)
    st = rng.integers(0, 50, 2000)  # many ties
    si = rng.integers(0, 100, 2000)
    queries = np.array([0, 3, 7, 29])
    expected, _ = build_histories(
        np.concatenate([su, queries]),
        np.concatenate([st, np.full(4, np.iinfo(np.int64).max)]),
        np.concatenate([si + 1, np.ones(4, dtype=np.int64)]),
        max_len=25,
    )
    np.testing.assert_array_equal(history_now((su, st, si), queries, 25, shuffle=False), expected[-4:])
