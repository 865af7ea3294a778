import numpy as np
import pytest

from training.data.history import build_histories


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
