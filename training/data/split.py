"""Offline-evaluation splits: hold out each user's latest events, vectorised over all rows at once.

"Latest" is by timestamp; equal timestamps need a tie-break. Leave-last-out breaks ties by row order (a file written
in time order then puts its last line last); carving validation out of an explicit train file uses a seeded random
order instead, because such files (ML-1M NCF train.tsv) carry no time at all and their row order is by item id.
"""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TRAIN, VALID, TEST = 0, 1, 2


def rank_from_end(user_codes: np.ndarray, timestamps: np.ndarray, tie_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row: its position counted from the user's latest event (0 = latest), and the user's event count.

    user_codes, timestamps, tie_key: (n,) integer arrays; among equal timestamps the larger tie_key is later.
    """
    n = len(user_codes)
    order = np.lexsort((tie_key, timestamps, user_codes))  # (n,) rows grouped by user, oldest first
    sorted_users = user_codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])  # (n_users,) first sorted position
    sizes = np.diff(np.r_[starts, n])  # (n_users,)
    group = np.repeat(np.arange(len(starts)), sizes)  # (n,) group of each sorted position
    ends = starts + sizes  # exclusive
    rank = np.empty(n, dtype=np.int64)
    rank[order] = ends[group] - 1 - np.arange(n)
    count = np.empty(n, dtype=np.int64)
    count[order] = sizes[group]
    return rank, count


def leave_last_out_roles(user_codes: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Role of each row (TRAIN/VALID/TEST): the latest event is test for users with >= 2 events, the second latest
    is validation for users with >= 3, so every evaluated user keeps at least one training event."""
    rank, count = rank_from_end(user_codes, timestamps, np.arange(len(user_codes)))
    roles = np.full(len(user_codes), TRAIN, dtype=np.int8)
    roles[(rank == 0) & (count >= 2)] = TEST
    roles[(rank == 1) & (count >= 3)] = VALID
    return roles


def last_event_mask(user_codes: np.ndarray, timestamps: np.ndarray, seed: int) -> np.ndarray:
    """(n,) bool: each user's latest event, for users with >= 2 events; ties at the latest time are broken by a
    random order drawn from `seed`."""
    tie_key = np.random.default_rng(seed).permutation(len(user_codes))
    rank, count = rank_from_end(user_codes, timestamps, tie_key)
    return (rank == 0) & (count >= 2)


def user_codes(table: pa.Table) -> np.ndarray:
    """(n,) int64 dense codes of the user_id column (equal ids, equal codes)."""
    encoded = pc.dictionary_encode(table["user_id"]).combine_chunks()
    return np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)


def split_leave_last_out(table: pa.Table) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(train, valid, test) of an interaction table, each keeping the original row order."""
    roles = leave_last_out_roles(user_codes(table), _timestamps(table))
    return tuple(table.filter(pa.array(roles == role)) for role in (TRAIN, VALID, TEST))  # type: ignore[return-value]


def carve_validation(table: pa.Table, seed: int) -> tuple[pa.Table, pa.Table]:
    """(train, valid): each user's latest training event (users with >= 2) moves to validation."""
    held = last_event_mask(user_codes(table), _timestamps(table), seed)
    return table.filter(pa.array(~held)), table.filter(pa.array(held))


def _timestamps(table: pa.Table) -> np.ndarray:
    return np.asarray(table["timestamp"].to_numpy(), dtype=np.int64)
