"""AUC and per-user grouped AUC from ranks (numpy only).

AUC is the Mann-Whitney statistic: the probability that a random positive outscores a random negative, ties counting
one half. With 1-based ranks r over all samples (tied scores share their average rank),

    AUC = (Σ_{positives} r - P (P + 1) / 2) / (P · N)

Grouped AUC (GAUC) is each user's AUC over their own samples, averaged with weights = the user's number of samples.
Users whose samples are all one class have no AUC and are skipped (neither in the sum nor in the weights).
"""

import numpy as np

from models.errors import QuiverError


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise QuiverError(f"auc: {y.size} labels for {s.size} scores")
    if np.isnan(s).any():
        raise QuiverError("auc: NaN scores")
    return y.astype(bool), s


def _tied_average_ranks(keys: tuple[np.ndarray, ...], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort by keys (np.lexsort order: last key primary) and give each sorted position the average 0-based position
    of its run of equal keys. Returns (order (n,), average position (n,) aligned with the sorted order)."""
    order = np.lexsort(keys)
    sorted_keys = [k[order] for k in keys]
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = np.any([k[1:] != k[:-1] for k in sorted_keys], axis=0)
    run_id = np.cumsum(new_run) - 1  # (n,)
    run_start = np.flatnonzero(new_run)  # (runs,)
    run_end = np.append(run_start[1:], n)  # exclusive
    return order, ((run_start + run_end - 1) / 2.0)[run_id]


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC of binary labels (1 = positive) given scores; NaN when one class is absent."""
    y, s = _check(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order, pos = _tied_average_ranks((s,), y.size)
    rank_sum = float((pos + 1.0)[y[order]].sum())  # 1-based ranks of the positives
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def grouped_auc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[float, int]:
    """(GAUC, number of users that counted). Ranks are taken within each group in one sort by (group, score)."""
    y, s = _check(labels, scores)
    g = np.asarray(groups).ravel()
    if g.shape != y.shape:
        raise QuiverError(f"grouped auc: {g.size} group ids for {y.size} labels")
    if y.size == 0:
        return float("nan"), 0
    _, g = np.unique(g, return_inverse=True)  # dense 0..G-1
    g = g.ravel()
    order, pos = _tied_average_ranks((s, g), y.size)  # sorted by group, then score
    g_sorted, y_sorted = g[order], y[order]
    n_groups = int(g.max()) + 1
    size = np.bincount(g_sorted, minlength=n_groups).astype(np.float64)  # (G,)
    start = np.concatenate([[0.0], np.cumsum(size)[:-1]])  # (G,) first sorted position of each group
    rank = pos - start[g_sorted] + 1.0  # (n,) 1-based rank inside the group (ties inside a group only)
    n_pos = np.bincount(g_sorted, weights=y_sorted, minlength=n_groups)  # (G,)
    n_neg = size - n_pos
    rank_sum = np.bincount(g_sorted, weights=rank * y_sorted, minlength=n_groups)  # (G,)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan"), 0
    per_group = (rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float(np.sum(per_group * size[ok]) / np.sum(size[ok])), int(ok.sum())
