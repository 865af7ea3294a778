"""Per-event user histories without leakage: each event sees only the same user's strictly earlier events."""

import numpy as np

_CHUNK = 1 << 16  # rows gathered per step: bounds the (chunk, max_len) temporaries to a few tens of MB


def build_histories(
    users: np.ndarray, timestamps: np.ndarray, items: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """The history of every row: the same user's items with a strictly smaller timestamp.

    Rows may come in any order. hist[i] holds the most recent `max_len` such items, oldest first, zero-padded at the
    end; lengths[i] is how many are filled. Events at the same timestamp as row i are excluded (they are not
    "before" it), so neither the target nor anything simultaneous leaks in; among equal timestamps earlier rows are
    taken as older.

    Test-time histories: concatenate the train, valid and test rows, call this once, and keep the test rows' outputs;
    each test event then sees the user's training and validation events that precede it.

    users, timestamps, items: (n,) int64; items are encoded ids >= 1 (0 is the padding).
    Returns hist (n, max_len) int64 and lengths (n,) int64.
    """
    if max_len < 1:
        raise ValueError("max_len must be >= 1")
    users = np.asarray(users, dtype=np.int64)
    timestamps = np.asarray(timestamps, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    n = len(users)
    if not len(timestamps) == len(items) == n:
        raise ValueError("users, timestamps and items must have the same length")
    if n == 0:
        return np.zeros((0, max_len), dtype=np.int64), np.zeros(0, dtype=np.int64)
    order = np.lexsort((timestamps, users))  # (n,) stable: by user, then time, then row
    sorted_users = users[order]
    sorted_times = timestamps[order]
    sorted_items = items[order]
    positions = np.arange(n)
    new_user = np.r_[True, sorted_users[1:] != sorted_users[:-1]]  # (n,)
    new_time = new_user | np.r_[True, sorted_times[1:] != sorted_times[:-1]]  # (n,) start of a (user, time) run
    user_start = np.maximum.accumulate(np.where(new_user, positions, 0))  # (n,) first position of the user
    end = np.maximum.accumulate(np.where(new_time, positions, 0))  # (n,) exclusive: first event at this time
    start = np.maximum(user_start, end - max_len)  # (n,)

    # Back to the caller's row order; each row's history is then one contiguous slice of sorted_items.
    row_start = np.empty(n, dtype=np.int64)
    row_start[order] = start
    lengths = np.empty(n, dtype=np.int64)
    lengths[order] = end - start

    padded = np.concatenate([sorted_items, np.zeros(max_len, dtype=np.int64)])  # windows near the end stay in range
    windows = np.lib.stride_tricks.sliding_window_view(padded, max_len)  # (n + 1, max_len) view, no copy
    hist = np.empty((n, max_len), dtype=np.int64)
    offsets = np.arange(max_len)  # (max_len,)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        rows = windows[row_start[lo:hi]]  # (chunk, max_len) copy
        rows[offsets >= lengths[lo:hi, None]] = 0
        hist[lo:hi] = rows
    return hist, lengths
