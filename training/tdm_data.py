"""Training examples for the TDM reranker: clicks and the negatives a reranker meets in production.

Each training click (user, history at that time, item) is a positive. Its `per_positive` negatives share the click's
user and history and mix two sources by `retrieved_ratio`:
  - retrieved: items the two-tower retriever puts in the user's top `retrieve_k` (queried with the user's training
    history, their training clicks excluded): plausible items the user did not click, the reranker's real job;
  - popular: catalog items drawn by popularity^alpha (the sampler of the two-tower trainer), which keep the model
    calibrated on items the retriever would never show.
A negative that equals its own positive is redrawn from the popular source.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from models.bundle import ModelBundle
from models.inputs import item_vectors, user_vectors
from models.rank import retriever_model
from training.examples import EncodedData, history_now
from training.ranking import Csr, merged_top_k


def row_ids(items: pa.Table, rows: np.ndarray) -> list[list[str]]:
    """(Q, L) catalog row + 1 matrices (0 = padding) -> item-id lists, order kept."""
    ids = np.asarray(items["item_id"].to_pylist(), dtype=object)
    return [[str(x) for x in ids[r[r > 0] - 1]] for r in rows]


def catalog_vectors(retriever: ModelBundle, catalog: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The retriever's item vectors in `catalog`'s row order (I, D) float32, matched by item id, and the rows of
    `catalog` it does not know (their vectors are zero: callers exclude them)."""
    ours = catalog["item_id"].combine_chunks().cast(pa.string())
    theirs = retriever.items["item_id"].combine_chunks().cast(pa.string())
    pos = pc.index_in(ours, value_set=theirs)  # (I,) retriever row of each of our items, null if unknown
    known = pos.is_valid().to_numpy(zero_copy_only=False)
    vectors = np.concatenate([v for _, v in item_vectors(retriever)])  # (I_r, D)
    items = np.zeros((len(ours), vectors.shape[1]), dtype=np.float32)  # (I, D) in our row order
    items[known] = vectors[pc.drop_null(pos).to_numpy().astype(np.int64)]
    return items, np.flatnonzero(~known)


def exclude_also(c: Csr, cols: np.ndarray) -> Csr:
    """c with the columns `cols` added to every row."""
    if len(cols) == 0:
        return c
    rows = np.arange(c.n_rows)
    pairs_rows = np.concatenate([np.repeat(rows, c.row_lengths()), np.repeat(rows, len(cols))])
    return Csr.from_pairs(pairs_rows, np.concatenate([c.indices, np.tile(cols, c.n_rows)]), c.n_rows)


def retrieve(
    retriever: ModelBundle,
    users: pa.Table,
    histories: Sequence[Sequence[str]],
    catalog: pa.Table,
    exclude: Csr,
    k: int,
    chunk: int = 2048,
) -> np.ndarray:
    """Top-k items of the two-tower retriever per user, as rows of `catalog` (best first, -1 padding).

    users: one row per query (user_id + profile columns); histories: item ids oldest first; exclude: rows of
    `catalog` never returned (the user's known items). The retriever's own catalog is matched to `catalog` by item
    id; items it does not know are never returned.
    """
    model = retriever_model(retriever)
    model.eval()
    items, unknown = catalog_vectors(retriever, catalog)
    exclude = exclude_also(exclude, unknown)  # unknown items join every user's exclusion set
    items_t = torch.from_numpy(items)
    out = np.full((users.num_rows, k), -1, dtype=np.int64)
    for s in range(0, users.num_rows, chunk):
        e = min(s + chunk, users.num_rows)
        u, mask = user_vectors(retriever, users.slice(s, e - s), histories[s:e])  # (c, K, D), (c, K)
        sub = Csr(exclude.indptr[s : e + 1] - exclude.indptr[s], exclude.indices[exclude.indptr[s] : exclude.indptr[e]])
        out[s:e] = merged_top_k(u, mask, items_t, sub, k)[1]
    return out


def training_pool(retriever: ModelBundle, enc: EncodedData, train_ts: np.ndarray, k: int, shuffle: bool) -> np.ndarray:
    """(U, k) catalog rows the retriever returns for each user at the end of training, training clicks excluded."""
    ev = enc.train
    length = enc.recent.shape[1]
    hist = history_now((ev.user_row, train_ts, ev.item_row), np.arange(len(enc.users)), length, shuffle)  # (U, L)
    exclude = Csr.from_pairs(ev.user_row, ev.item_row, len(enc.users))
    return retrieve(retriever, enc.users, row_ids(enc.items, hist), enc.items, exclude, k)


class ClickRetrieval:
    """What the retriever shows at the moment of each training click: its top `k` for the history that click saw.

    A reranker meets the retriever's list for the user's current history, and the item clicked next sits inside it
    beside items that were shown and not clicked. A pool retrieved once per user from their final history (the
    `user` source) mismatches both sides for early clicks. Lists are computed per batch (one (B, I) matmul and top-k)
    from click-time user vectors kept for every click, so nothing of size (clicks, k) is stored.
    """

    def __init__(self, retriever: ModelBundle, enc: EncodedData, k: int, chunk: int = 4096) -> None:
        model = retriever_model(retriever)
        model.eval()
        ev = enc.train
        self.k = k
        items, unknown = catalog_vectors(retriever, enc.items)
        self.items = torch.from_numpy(items)  # (I, D) in our catalog's rows
        # Never in a list: the user's own clicks (they are not negatives) and items the retriever does not know.
        self.seen = exclude_also(Csr.from_pairs(ev.user_row, ev.item_row, len(enc.users)), unknown)
        n = len(ev.user_row)
        parts, masks = [], []
        for s in range(0, n, chunk):
            idx = np.arange(s, min(s + chunk, n))
            users = enc.users.take(pa.array(ev.user_row[idx]))
            u, mask = user_vectors(retriever, users, row_ids(enc.items, ev.histories(idx)))  # (c, K, D), (c, K)
            parts.append(u.float())
            masks.append(mask)
        self.vectors = torch.cat(parts)  # (n, K, D) each click's interest vectors
        self.mask = torch.cat(masks)  # (n, K)

    def top(self, idx: np.ndarray, user_row: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Clicks idx -> their lists (B, k) of catalog rows, best first, -1 padding (the user's clicks never
        appear), and (B,) whether each click's own item would have been in its list."""
        u, mask = self.vectors[idx], self.mask[idx]  # (B, K, D), (B, K)
        scores, rows = merged_top_k(u, mask, self.items, self.seen.take(user_row), self.k)
        with torch.no_grad():
            s = torch.einsum("bkd,bd->bk", u, self.items[torch.from_numpy(positive)])  # (B, K)
            s_pos = s.masked_fill(~mask, float("-inf")).amax(1).numpy()  # (B,) the merge's score of the click
        kth = np.where(rows[:, -1] >= 0, scores[:, -1], -np.inf)  # (B,) the last listed score
        return rows, s_pos >= kth


@dataclass
class NegativeMixer:
    """Draws (B, k) negatives for B clicks: round(k * retrieved_ratio) columns from each click's retrieved list (its
    user's row of `pool`, or lists given per click), the rest by popularity^alpha; collisions with the click's own item
    are redrawn by popularity."""

    pool: np.ndarray | None  # (U, K) catalog rows, best first, -1 padding; None: popularity only
    popularity: np.ndarray  # (I,) training counts
    retrieved_ratio: float
    alpha: float
    seed: int

    def __post_init__(self) -> None:
        weights = np.maximum(self.popularity.astype(np.float64), 1.0) ** self.alpha  # unseen items count as 1
        self.cdf = np.cumsum(weights / weights.sum())  # (I,)
        self.rng = np.random.default_rng(self.seed)

    def popular(self, shape: tuple[int, ...]) -> np.ndarray:
        u = self.rng.random(shape) * self.cdf[-1]
        return np.minimum(np.searchsorted(self.cdf, u, side="right"), len(self.cdf) - 1)

    def sample(self, user_row: np.ndarray, positive: np.ndarray, k: int, lists: np.ndarray | None = None) -> np.ndarray:
        """user_row, positive (B,) -> (B, k) catalog rows. lists (B, K): each click's own retrieved list (-1
        padding), used instead of the user's pool row."""
        b = len(user_row)
        out = self.popular((b, k))
        if lists is None and self.pool is not None:
            lists = self.pool[user_row]  # (B, K)
        r = round(k * self.retrieved_ratio) if lists is not None else 0
        if r > 0:
            assert lists is not None
            n = (lists >= 0).sum(1, keepdims=True)  # (B, 1) valid entries, best first
            j = (self.rng.random((b, r)) * n).astype(np.int64)  # (B, r) uniform over the list
            drawn = lists[np.arange(b)[:, None], np.minimum(j, lists.shape[1] - 1)]
            out[:, :r] = np.where(n > 0, drawn, out[:, :r])  # an empty list falls back to popular items
        for _ in range(100):  # redraw collisions with the click itself (rare: popular items, tiny catalogs)
            clash = out == positive[:, None]
            if not clash.any():
                break
            out[clash] = self.popular((int(clash.sum()),))
        return out


@dataclass
class Examples:
    """Click-level examples with their negatives: item (n, 1 + k) has the click in column 0."""

    user_row: np.ndarray  # (n,)
    hist: np.ndarray  # (n, L) catalog row + 1, oldest first
    item: np.ndarray  # (n, 1 + k)

    def labels(self) -> np.ndarray:
        lab = np.zeros(self.item.shape, dtype=np.int64)
        lab[:, 0] = 1
        return lab


def validation_examples(enc: EncodedData, mixer: NegativeMixer, k: int) -> Examples | None:
    """One row per validation user (their first held-out item) with k fixed negatives, drawn once before training."""
    q = enc.valid
    if q is None or len(q.user_row) == 0:
        return None
    has = q.truth.row_lengths() > 0
    positive = q.truth.indices[q.truth.indptr[:-1][has]]  # (Q',)
    negatives = mixer.sample(q.user_row[has], positive, k)  # (Q', k)
    return Examples(q.user_row[has], q.hist[has], np.concatenate([positive[:, None], negatives], axis=1))
