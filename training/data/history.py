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


class OtherEvents:
    """Histories for training data with no order (`data.history: others`): for each event, the same user's *other*
    training events, never the event itself.

    Users with at most `max_len` other events get all of them; larger users get `max_len` drawn at random (with
    replacement) afresh at every call, so each epoch sees different samples of the same set: the mean-pooled history
    is an unbiased estimate of the mean over the whole set.
    """

    def __init__(self, users: np.ndarray, items: np.ndarray, max_len: int, seed: int) -> None:
        users = np.asarray(users, dtype=np.int64)
        order = np.argsort(users, kind="stable")
        counts = np.bincount(users)
        starts = np.cumsum(counts) - counts
        self.items = np.asarray(items, dtype=np.int64)[order]  # (n,) grouped by user
        position = np.empty(len(users), dtype=np.int64)
        position[order] = np.arange(len(users))
        self.start = starts[users]  # (n,) where each event's user group begins
        self.own = position - self.start  # (n,) the event's offset inside its group
        self.others = counts[users] - 1  # (n,)
        self.max_len = max_len
        self.rng = np.random.default_rng(seed)

    def sample(self, idx: np.ndarray) -> np.ndarray:
        """idx (B,) event rows -> (B, max_len) items, zero-padded at the end."""
        others = self.others[idx][:, None]  # (B, 1)
        slots = np.arange(self.max_len)[None, :]  # (1, L)
        random = (self.rng.random((len(idx), self.max_len)) * others).astype(np.int64)  # (B, L) in [0, others)
        offset = np.where(others <= self.max_len, slots, random)  # small users: each other event exactly once
        offset = offset + (offset >= self.own[idx][:, None])  # skip the event itself
        valid = slots < others
        hist = self.items[np.where(valid, self.start[idx][:, None] + offset, 0)]
        return np.where(valid, hist, 0)
