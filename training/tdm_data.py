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
from training.ranking import Csr, top_k_items


def row_ids(items: pa.Table, rows: np.ndarray) -> list[list[str]]:
    """(Q, L) catalog row + 1 matrices (0 = padding) -> item-id lists, order kept."""
    ids = np.asarray(items["item_id"].to_pylist(), dtype=object)
    return [[str(x) for x in ids[r[r > 0] - 1]] for r in rows]


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
    ours = catalog["item_id"].combine_chunks().cast(pa.string())
    theirs = retriever.items["item_id"].combine_chunks().cast(pa.string())
    pos = pc.index_in(ours, value_set=theirs)  # (I,) retriever row of each of our items, null if unknown
    known = pos.is_valid().to_numpy(zero_copy_only=False)
    vectors = np.concatenate([v for _, v in item_vectors(retriever)])  # (I_r, D)
    items = np.zeros((len(ours), vectors.shape[1]), dtype=np.float32)  # (I, D) in our row order
    items[known] = vectors[pc.drop_null(pos).to_numpy().astype(np.int64)]
    if not known.all():  # unknown items join every user's exclusion set
        missing = np.flatnonzero(~known)
        rows = np.concatenate(
            [
                np.repeat(np.arange(exclude.n_rows), exclude.row_lengths()),
                np.repeat(np.arange(exclude.n_rows), len(missing)),
            ]
        )
        cols = np.concatenate([exclude.indices, np.tile(missing, exclude.n_rows)])
        exclude = Csr.from_pairs(rows, cols, exclude.n_rows)
    items_t = torch.from_numpy(items)
    out = np.full((users.num_rows, k), -1, dtype=np.int64)
    for s in range(0, users.num_rows, chunk):
        e = min(s + chunk, users.num_rows)
        u, mask = user_vectors(retriever, users.slice(s, e - s), histories[s:e])  # (c, K, D), (c, K)
        sub = Csr(exclude.indptr[s : e + 1] - exclude.indptr[s], exclude.indices[exclude.indptr[s] : exclude.indptr[e]])
        if u.shape[1] == 1:
            _, top = top_k_items(u[:, 0], items_t, sub, k)
        else:
            _, top = top_k_items(u, items_t, sub, k, interest_mask=mask)
        out[s:e] = top
    return out


def training_pool(retriever: ModelBundle, enc: EncodedData, train_ts: np.ndarray, k: int, shuffle: bool) -> np.ndarray:
    """(U, k) catalog rows the retriever returns for each user at the end of training, training clicks excluded."""
    ev = enc.train
    length = enc.recent.shape[1]
    hist = history_now((ev.user_row, train_ts, ev.item_row), np.arange(len(enc.users)), length, shuffle)  # (U, L)
    exclude = Csr.from_pairs(ev.user_row, ev.item_row, len(enc.users))
    return retrieve(retriever, enc.users, row_ids(enc.items, hist), enc.items, exclude, k)


@dataclass
class NegativeMixer:
    """Draws (B, k) negatives for B clicks: round(k * retrieved_ratio) columns from each user's retrieved pool, the
    rest by popularity^alpha; collisions with the click's own item are redrawn by popularity."""

    pool: np.ndarray | None  # (U, K) catalog rows, best first, -1 padding; None: popularity only
    popularity: np.ndarray  # (I,) training counts
    retrieved_ratio: float
    alpha: float
    seed: int

    def __post_init__(self) -> None:
        weights = np.maximum(self.popularity.astype(np.float64), 1.0) ** self.alpha  # unseen items count as 1
        self.cdf = np.cumsum(weights / weights.sum())  # (I,)
        self.rng = np.random.default_rng(self.seed)
        self.pool_len = None if self.pool is None else (self.pool >= 0).sum(1)  # (U,) valid entries

    def popular(self, shape: tuple[int, ...]) -> np.ndarray:
        u = self.rng.random(shape) * self.cdf[-1]
        return np.minimum(np.searchsorted(self.cdf, u, side="right"), len(self.cdf) - 1)

    def sample(self, user_row: np.ndarray, positive: np.ndarray, k: int) -> np.ndarray:
        """user_row, positive (B,) -> (B, k) catalog rows."""
        b = len(user_row)
        out = self.popular((b, k))
        r = round(k * self.retrieved_ratio) if self.pool is not None else 0
        if r > 0:
            assert self.pool is not None and self.pool_len is not None
            n = self.pool_len[user_row][:, None]  # (B, 1)
            j = (self.rng.random((b, r)) * n).astype(np.int64)  # (B, r) uniform over the user's pool
            drawn = self.pool[user_row[:, None], np.minimum(j, self.pool.shape[1] - 1)]
            out[:, :r] = np.where(n > 0, drawn, out[:, :r])  # an empty pool falls back to popular items
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
