"""Hard negatives (DESIGN §5): up to `num_hard` items per training row that look relevant but were not clicked.

Two pools: a user -> "exposed, not clicked" table when the data has one, otherwise the items of the positive's
category. Either way items the user ever interacted with (in training) are rejected. Each row's picks travel as
`hard_neg_indices` (H, 2) = (row, slot), scored against that row's user only (DESIGN §3).
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.errors import QuiverError
from training.data.readers import read_table_file


class HardNegativeSampler:
    """Pools are stored flat: pool p holds flat[start[p]:start[p] + count[p]]; each training row names its pool."""

    def __init__(
        self,
        flat: np.ndarray,
        start: np.ndarray,
        count: np.ndarray,
        pool_of_user: bool,
        seen_user: np.ndarray,
        seen_item: np.ndarray,
        n_items: int,
        num_hard: int,
        seed: int,
    ) -> None:
        self.flat, self.start, self.count = flat, start, count
        self.pool_of_user = pool_of_user  # True: pool id = user row; False: pool id = the positive's category
        self.item_pool = np.empty(0, dtype=np.int64)
        self.seen = np.unique(seen_user.astype(np.int64) * n_items + seen_item)  # sorted user*I + item keys
        self.n_items, self.num_hard = n_items, num_hard
        self.rng = np.random.default_rng(seed)

    @classmethod
    def by_category(
        cls, category: np.ndarray, seen: tuple[np.ndarray, np.ndarray], n_items: int, num_hard: int, seed: int
    ) -> "HardNegativeSampler":
        """category (I,) int code per catalog row, -1 when unknown (such positives get no hard negatives)."""
        known = np.flatnonzero(category >= 0)
        order = known[np.argsort(category[known], kind="stable")]  # items grouped by category
        n_cat = int(category.max(initial=-1)) + 1
        count = np.bincount(category[known], minlength=n_cat)
        start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
        s = cls(order, start, count, False, *seen, n_items, num_hard, seed)
        s.item_pool = category.astype(np.int64)
        return s

    @classmethod
    def by_exposures(
        cls,
        exp_user: np.ndarray,
        exp_item: np.ndarray,
        n_users: int,
        seen: tuple[np.ndarray, np.ndarray],
        n_items: int,
        num_hard: int,
        seed: int,
    ) -> "HardNegativeSampler":
        order = np.argsort(exp_user, kind="stable")
        count = np.bincount(exp_user, minlength=n_users)
        start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
        return cls(exp_item[order], start, count, True, *seen, n_items, num_hard, seed)

    def sample(self, user_row: np.ndarray, pos_item: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """user_row, pos_item (B,) -> items (H,) catalog rows and indices (H, 2) = (row, slot), slots 0.. per row.

        Draws 2 * num_hard candidates per row with replacement from its pool, then drops the positive, anything the
        user interacted with, and repeats within the row; the first num_hard survivors are kept. A row whose pool
        is small or mostly seen gets fewer (possibly none): its empty cells stay masked in the logits."""
        b, m = len(user_row), 2 * self.num_hard
        pool = user_row if self.pool_of_user else self.item_pool[pos_item]  # (B,)
        valid_pool = pool >= 0
        count = np.where(valid_pool, self.count[np.maximum(pool, 0)], 0)  # (B,)
        offs = (self.rng.random((b, m)) * np.maximum(count, 1)[:, None]).astype(np.int64)  # (B, m)
        cand = self.flat[np.minimum(self.start[np.maximum(pool, 0)][:, None] + offs, len(self.flat) - 1)]
        keys = user_row[:, None].astype(np.int64) * self.n_items + cand  # (B, m)
        pos_in = np.searchsorted(self.seen, keys)
        seen = self.seen[np.minimum(pos_in, len(self.seen) - 1)] == keys
        ok = (count[:, None] > 0) & ~seen & (cand != pos_item[:, None])  # (B, m)
        # Repeats within a row: keep the first occurrence only.
        row_key = np.arange(b)[:, None] * self.n_items + cand  # (B, m)
        flat_key = np.where(ok, row_key, -1).ravel()
        _, first = np.unique(flat_key, return_index=True)
        keep = np.zeros(b * m, dtype=bool)
        keep[first] = True
        ok &= keep.reshape(b, m)
        slot = np.cumsum(ok, axis=1) - 1  # (B, m) rank among the row's survivors
        ok &= slot < self.num_hard
        rows, cols = np.nonzero(ok)
        return cand[rows, cols], np.stack([rows, slot[rows, cols]], axis=1).astype(np.int64)


def item_categories(items: pa.Table, column: str) -> np.ndarray:
    """(I,) int code of each catalog row's category, -1 where missing."""
    if column not in items.column_names:
        raise QuiverError(f"hard_negative.category_column: the item table has no column {column!r}")
    values = items[column].cast(pa.string())
    codes = pc.fill_null(values.dictionary_encode().combine_chunks().indices, -1)
    return codes.to_numpy(zero_copy_only=False).astype(np.int64)


def read_exposures(path: Path, user_index: pa.Array, item_index: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """user and catalog rows of an exposures file; pairs whose user or item is unknown are dropped (exposure logs
    usually cover more than the training window)."""
    table = read_table_file(path, types={"user_id": pa.string(), "item_id": pa.string()}, checks={})
    for column in ("user_id", "item_id"):
        if column not in table.column_names:
            raise QuiverError(f"{path}: missing column '{column}' (an exposures file holds user_id,item_id pairs)")
    u = pc.index_in(table["user_id"].cast(pa.string()), value_set=user_index)
    i = pc.index_in(table["item_id"].cast(pa.string()), value_set=item_index)
    both = pc.and_(pc.is_valid(u), pc.is_valid(i))
    u, i = pc.filter(u, both), pc.filter(i, both)
    return u.to_numpy().astype(np.int64), i.to_numpy().astype(np.int64)
