"""Offline ranking metrics over arrays: full-catalog top-k, the sampled (NCF) protocol, and the popularity baseline.

Evaluation works on plain arrays (user vectors, item vectors, item rows) so it does not depend on how a model was
built. Scoring uses torch for the matmul and top-k (CPU by default, CUDA tensors work unchanged); the metric formulas
use numpy. Users are processed in chunks so a 22k x 12k score matrix is never allocated at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.errors import QuiverError


@dataclass(frozen=True, eq=False)
class Csr:
    """Per-user item sets in compressed-row form: row u holds indices[indptr[u]:indptr[u + 1]].

    Used for the items to exclude from a user's ranking (their training items) and for the ground truth.
    """

    indptr: np.ndarray  # (n_rows + 1,) int64, starts at 0, non-decreasing, ends at nnz
    indices: np.ndarray  # (nnz,) int64 item rows

    def __post_init__(self) -> None:
        indptr = np.asarray(self.indptr, dtype=np.int64)
        indices = np.asarray(self.indices, dtype=np.int64)
        if indptr.ndim != 1 or indptr.size == 0 or indices.ndim != 1:
            raise QuiverError("Csr: indptr must be a non-empty 1-d array and indices a 1-d array")
        if indptr[0] != 0 or indptr[-1] != indices.size or np.any(np.diff(indptr) < 0):
            raise QuiverError(f"Csr: indptr must start at 0, never decrease and end at nnz={indices.size}")
        object.__setattr__(self, "indptr", indptr)
        object.__setattr__(self, "indices", indices)

    @classmethod
    def from_pairs(cls, rows: np.ndarray, cols: np.ndarray, n_rows: int) -> Csr:
        """Build from (row, col) pairs; duplicates collapse so each row is a set, sorted by column."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        cols = np.asarray(cols, dtype=np.int64).ravel()
        if rows.shape != cols.shape:
            raise QuiverError(f"Csr.from_pairs: {rows.size} rows but {cols.size} cols")
        if n_rows < 0 or (rows.size and (rows.min() < 0 or rows.max() >= n_rows)):
            raise QuiverError(f"Csr.from_pairs: row ids must lie in [0, {n_rows})")
        if cols.size and cols.min() < 0:
            raise QuiverError("Csr.from_pairs: column ids must be >= 0")
        pairs = np.unique(np.stack([rows, cols], axis=1), axis=0)  # (nnz, 2), sorted by row then col
        counts = np.bincount(pairs[:, 0], minlength=n_rows) if pairs.size else np.zeros(n_rows, dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(indptr=indptr, indices=pairs[:, 1].astype(np.int64) if pairs.size else np.zeros(0, np.int64))

    @property
    def n_rows(self) -> int:
        return int(self.indptr.size - 1)

    def row(self, u: int) -> np.ndarray:
        """The item rows of user u (a view, not a copy)."""
        return self.indices[self.indptr[u] : self.indptr[u + 1]]

    def row_lengths(self) -> np.ndarray:
        return np.diff(self.indptr)  # (n_rows,)

    def take(self, rows: np.ndarray) -> Csr:
        """The rows `rows`, in that order (a row may repeat)."""
        lengths = self.row_lengths()[rows]  # (B,)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.repeat(self.indptr[:-1][rows] - indptr[:-1], lengths) + np.arange(indptr[-1])  # into indices
        return Csr(indptr, self.indices[flat])


def _check_top_k_inputs(
    user_vecs: torch.Tensor, interest_mask: torch.Tensor | None, item_vecs: torch.Tensor, exclude: Csr, k: int
) -> None:
    if k < 1:
        raise QuiverError(f"top-k: k must be >= 1, got {k}")
    if user_vecs.dim() not in (2, 3) or item_vecs.dim() != 2:
        raise QuiverError(
            f"top-k: user vectors must be (U, D) or (U, K, D) and item vectors (I, D); "
            f"got {tuple(user_vecs.shape)} and {tuple(item_vecs.shape)}"
        )
    if user_vecs.shape[-1] != item_vecs.shape[1]:
        raise QuiverError(f"top-k: user dim {user_vecs.shape[-1]} != item dim {item_vecs.shape[1]}")
    if interest_mask is not None:
        if user_vecs.dim() != 3:
            raise QuiverError("top-k: interest_mask is only valid with (U, K, D) multi-interest user vectors")
        if tuple(interest_mask.shape) != tuple(user_vecs.shape[:2]):
            raise QuiverError(
                f"top-k: interest_mask shape {tuple(interest_mask.shape)} != {tuple(user_vecs.shape[:2])}"
            )
    if exclude.n_rows != user_vecs.shape[0]:
        raise QuiverError(f"top-k: exclusion set has {exclude.n_rows} rows for {user_vecs.shape[0]} users")
    n_items = item_vecs.shape[0]
    if exclude.indices.size and (exclude.indices.min() < 0 or exclude.indices.max() >= n_items):
        raise QuiverError(f"top-k: exclusion item rows must lie in [0, {n_items})")


def _chunk_scores(users: torch.Tensor, mask: torch.Tensor | None, items_t: torch.Tensor) -> torch.Tensor:
    """Score one chunk of users against every item: (c, I).

    Multi-interest users get the max over their active interests. Taking top-k per interest and merging (dedupe,
    keep the best score) yields exactly the top-k of this max: an item's max is reached at some interest, and if it
    were not in that interest's top-k then k items would beat it there and hence also beat it in the max. Folding
    the interests into a running max keeps memory at (c, I) instead of (c, K, I).
    """
    if users.dim() == 2:
        return users @ items_t  # (c, D) @ (D, I) -> (c, I)
    best = torch.full((users.shape[0], items_t.shape[1]), float("-inf"), dtype=items_t.dtype, device=items_t.device)
    for j in range(users.shape[1]):
        scores = users[:, j] @ items_t  # (c, I)
        if mask is not None:
            scores.masked_fill_(~mask[:, j, None], float("-inf"))
        torch.maximum(best, scores, out=best)
    return best


def _order_by_score_then_row(vals: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row of (c, k) candidates by score descending, equal scores by item row ascending."""
    rows, perm = torch.sort(rows, dim=1)
    vals, order = torch.sort(vals.gather(1, perm), dim=1, descending=True, stable=True)
    return vals, rows.gather(1, order)


def _top_k_lowest_row_on_ties(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k of (c, I) scores, best first, where equal scores go to the lower item row.

    torch.topk picks arbitrarily among items tied with the k-th score, which would make baselines with many equal
    scores (popularity counts) differ between runs and devices. One extra candidate shows whether the k-th place is
    contested; only those rows take the slow path: keep every item strictly above the k-th value and fill the
    remaining places with the tied items in row order. Ties at -inf need no care: those slots become padding.
    """
    n_items = scores.shape[1]
    vals, rows = torch.topk(scores, min(k + 1, n_items), dim=1)  # (c, k or k + 1)
    if vals.shape[1] > k:
        contested = (vals[:, k - 1] == vals[:, k]) & (vals[:, k - 1] > float("-inf"))  # (c,)
        vals, rows = vals[:, :k].clone(), rows[:, :k].clone()
        if contested.any():
            slow = contested.nonzero()[:, 0]
            sub = scores[slow]  # (s, I)
            kth = vals[slow, k - 1 :]  # (s, 1)
            tied = sub == kth
            room = k - (sub > kth).sum(dim=1, keepdim=True)  # (s, 1) places left for tied items, >= 1
            chosen = (sub > kth) | (tied & (torch.cumsum(tied, dim=1) <= room))  # exactly k per row
            rows[slow] = chosen.nonzero()[:, 1].view(-1, k)
            vals[slow] = sub.gather(1, rows[slow])
    return _order_by_score_then_row(vals, rows)


def top_k_items(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    exclude: Csr,
    k: int,
    *,
    interest_mask: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over the full catalog, skipping each user's excluded (training) items.

    user_vecs is (U, D), or (U, K, D) for multi-interest models with interest_mask (U, K) bool marking the active
    interests (None = all active). Returns (scores (U, k) float32, item rows (U, k) int64), best first; ties are
    ordered by item row ascending. Slots beyond the items a user can still get hold row -1 and score -inf.
    Scoring runs on user_vecs' device in float32 (float64 if either input is float64); chunk_size users at a time.
    """
    _check_top_k_inputs(user_vecs, interest_mask, item_vecs, exclude, k)
    if chunk_size < 1:
        raise QuiverError(f"top-k: chunk_size must be >= 1, got {chunk_size}")
    device = user_vecs.device
    dtype = torch.float64 if torch.float64 in (user_vecs.dtype, item_vecs.dtype) else torch.float32
    n_users, n_items = user_vecs.shape[0], item_vecs.shape[0]
    take = min(k, n_items)
    out_scores = np.full((n_users, k), -np.inf, dtype=np.float64)
    out_rows = np.full((n_users, k), -1, dtype=np.int64)
    with torch.inference_mode():
        items_t = item_vecs.to(device=device, dtype=dtype).T  # (D, I)
        mask = interest_mask.to(device=device, dtype=torch.bool) if interest_mask is not None else None
        for start in range(0, n_users, chunk_size):
            stop = min(start + chunk_size, n_users)
            users = user_vecs[start:stop].to(dtype=dtype)
            scores = _chunk_scores(users, None if mask is None else mask[start:stop], items_t)  # (c, I)
            lo, hi = exclude.indptr[start], exclude.indptr[stop]
            if hi > lo:
                local_rows = np.repeat(np.arange(stop - start), np.diff(exclude.indptr[start : stop + 1]))  # (nnz_c,)
                local_cols = exclude.indices[lo:hi]  # (nnz_c,)
                scores[torch.from_numpy(local_rows).to(device), torch.from_numpy(local_cols).to(device)] = float("-inf")
            if take == 0:
                continue
            if torch.isnan(scores).any():
                raise QuiverError(f"top-k: NaN scores for users {start}..{stop - 1} (NaN in user or item vectors)")
            vals, idx = _top_k_lowest_row_on_ties(scores, take)  # (c, take), best first
            out_scores[start:stop, :take] = vals.double().cpu().numpy()
            out_rows[start:stop, :take] = idx.cpu().numpy()
    out_rows[np.isneginf(out_scores)] = -1  # excluded or masked-out items are not results
    return out_scores.astype(np.float32), out_rows


def merged_top_k(
    u: torch.Tensor, mask: torch.Tensor, items: torch.Tensor, exclude: Csr, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(B, K, D) interest vectors and their (B, K) mask -> scores and catalog rows (B, k) of the merged top-k (each
    item by its best active interest), best first; one-vector models take the plain matmul."""
    if u.shape[1] == 1:
        return top_k_items(u[:, 0], items, exclude, k)
    return top_k_items(u, items, exclude, k, interest_mask=mask)


def _dcg_discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))  # (k,): 1/log2(rank + 1), rank 1-based


def _truth_hits(top_items: np.ndarray, truth: Csr) -> np.ndarray:
    """(U, kmax) bool: is each ranked item in its user's truth set? Via sorted (user, item) keys, no Python loop."""
    n_users = top_items.shape[0]
    n_cols = int(max(top_items.max(initial=-1), truth.indices.max(initial=-1))) + 1
    truth_users = np.repeat(np.arange(n_users, dtype=np.int64), truth.row_lengths())
    truth_keys = np.sort(truth_users * n_cols + truth.indices)
    if truth_keys.size == 0:
        return np.zeros(top_items.shape, dtype=bool)
    top_keys = np.arange(n_users, dtype=np.int64)[:, None] * n_cols + top_items
    pos = np.minimum(np.searchsorted(truth_keys, top_keys), truth_keys.size - 1)
    return (truth_keys[pos] == top_keys) & (top_items >= 0)


def first_hit_ranks(top_items: np.ndarray, truth: Csr) -> np.ndarray:
    """(U,) int64 1-based position of each user's first truth item in its ranking, kmax + 1 when none is ranked.

    HR@K of a user is first_hit_rank <= K, so two models' per-user ranks give a paired comparison of HR at any K up
    to the ranking depth (training.compare)."""
    top_items = np.asarray(top_items).astype(np.int64, copy=False)
    hits = _truth_hits(top_items, truth)  # (U, kmax)
    return np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, top_items.shape[1] + 1).astype(np.int64)


def full_ranking_metrics(top_items: np.ndarray, truth: Csr, ks: list[int]) -> dict[str, float]:
    """Recall@K, HR@K and NDCG@K of full-catalog rankings against per-user ground-truth sets.

    top_items is (U, kmax) item rows, best first, -1 for padding, no repeats within a row. Only users with at
    least one truth item count (their number is returned as "users"). Recall divides hits by |truth|; NDCG uses
    binary relevance with IDCG over min(|truth|, K) positions, so a perfect ranking scores 1 even when |truth| > K.
    """
    top_items = np.asarray(top_items)
    if top_items.ndim != 2 or not np.issubdtype(top_items.dtype, np.integer):
        raise QuiverError(
            f"ranking metrics: top items must be (U, kmax) integer rows, got {top_items.dtype} {top_items.shape}"
        )
    top_items = top_items.astype(np.int64, copy=False)
    n_users, kmax = top_items.shape
    if truth.n_rows != n_users:
        raise QuiverError(f"ranking metrics: ground truth has {truth.n_rows} users, rankings have {n_users}")
    if not ks or any(kk < 1 or kk > kmax for kk in ks):
        raise QuiverError(f"ranking metrics: every K must lie in [1, {kmax}] (the ranking depth), got {ks}")
    n_truth = truth.row_lengths()  # (U,)
    active = n_truth > 0
    if not active.any():
        raise QuiverError("ranking metrics: no user has a ground-truth item; nothing to evaluate")

    hits = _truth_hits(top_items, truth)  # (U, kmax)
    hits, n_truth = hits[active], n_truth[active]

    discounts = _dcg_discounts(kmax)
    ideal_cum = np.cumsum(discounts)  # (kmax,) IDCG for 1..kmax relevant items
    result: dict[str, float] = {}
    for kk in ks:
        hit_k = hits[:, :kk]
        n_hits = hit_k.sum(axis=1)
        dcg = hit_k @ discounts[:kk]
        idcg = ideal_cum[np.minimum(n_truth, kk) - 1]
        result[f"Recall@{kk}"] = float(np.mean(n_hits / n_truth))
        result[f"HR@{kk}"] = float(np.mean(n_hits > 0))
        result[f"NDCG@{kk}"] = float(np.mean(dcg / idcg))
    result["users"] = int(active.sum())
    return result


def sampled_metrics(pos_scores: np.ndarray, neg_scores: np.ndarray, k: int = 10) -> dict[str, float]:
    """HR@k and NDCG@k of the sampled (NCF) protocol: each user's positive ranked among itself and M negatives.

    rank = 1 + #(neg > pos) + #(neg == pos): a negative that ties the positive counts as ranked above it. This is the
    conservative choice, so a model that scores everything equal (or collapses) does not earn a perfect rank.
    """
    pos = np.asarray(pos_scores, dtype=np.float64)
    neg = np.asarray(neg_scores, dtype=np.float64)
    if pos.ndim != 1 or neg.ndim != 2 or neg.shape[0] != pos.shape[0]:
        raise QuiverError(f"sampled metrics: need pos (U,) and neg (U, M), got {pos.shape} and {neg.shape}")
    if pos.size == 0:
        raise QuiverError("sampled metrics: no users to evaluate")
    if k < 1:
        raise QuiverError(f"sampled metrics: k must be >= 1, got {k}")
    rank = sampled_ranks(pos, neg)  # (U,) 1-based
    hit = rank <= k
    ndcg = np.where(hit, 1.0 / np.log2(rank + 1.0), 0.0)
    return {f"HR@{k}": float(hit.mean()), f"NDCG@{k}": float(ndcg.mean()), "users": int(pos.size)}


def sampled_ranks(pos_scores: np.ndarray, neg_scores: np.ndarray) -> np.ndarray:
    """(U,) int64 1-based rank of each user's positive among itself and its M negatives; ties rank it lower."""
    pos = np.asarray(pos_scores, dtype=np.float64)
    neg = np.asarray(neg_scores, dtype=np.float64)
    return 1 + (neg >= pos[:, None]).sum(axis=1)


def popularity_scores(train_item_rows: np.ndarray, n_items: int) -> np.ndarray:
    """Training interaction count per item row: (n_items,) float32, the popularity baseline's scorer."""
    rows = np.asarray(train_item_rows, dtype=np.int64).ravel()
    if rows.size and (rows.min() < 0 or rows.max() >= n_items):
        raise QuiverError(f"popularity: training item rows must lie in [0, {n_items})")
    return np.bincount(rows, minlength=n_items).astype(np.float32)


def popularity_top_k(popularity: np.ndarray, exclude: Csr, k: int) -> np.ndarray:
    """Most popular items per user minus their excluded items: (U, k) item rows, -1 padding.

    Runs through top_k_items with a 1-dim "vector" per item whose value is its position in the global popularity
    order (count descending, then row ascending), so every score is distinct and equal counts break by row.
    """
    popularity = np.asarray(popularity, dtype=np.float64).ravel()
    n_items = popularity.size
    order = np.argsort(-popularity, kind="stable")  # most popular first, ties by row ascending
    strength = np.empty(n_items, dtype=np.float64)
    strength[order] = np.arange(n_items, 0, -1, dtype=np.float64)  # distinct, larger = more popular
    users = torch.ones((exclude.n_rows, 1), dtype=torch.float64)
    _, rows = top_k_items(users, torch.from_numpy(strength)[:, None], exclude, k)
    return rows
