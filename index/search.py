"""Top-k search for single- and multi-interest users, with exclusion, used by evaluation and serving (DESIGN §7).

All active interest vectors of a batch go to the index in one call (index/backend.py's `Searcher`, FAISS or ScaNN);
per user the hits of every interest are merged (an item found by several interests keeps its best score and the
interest that gave it), excluded items are dropped, and the -1 padding never comes out. Exclusion must not shorten the
answer, so the search over-fetches k plus the number of excluded items that are in the catalog, and doubles the fetch
(widening the search: more HNSW candidates, IVF lists or ScaNN leaves) for users still short until the catalog is
exhausted: exactly k items come back whenever the catalog holds k non-excluded items that the index can reach.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from index.backend import Searcher, as_searcher
from index.bundle import IndexBundle
from index.filter import Passing, gathered, search_exact
from models.errors import QuiverError

OVERFETCH_MARGIN = 1.25  # a filtered over-fetch asks this much more than the selectivity alone predicts
FILTERED_ATTEMPTS = 3  # widenings of a filtered search before the users still short are scored exactly


@dataclass(frozen=True)
class Hit:
    item_id: str
    score: float
    interest: int  # which of the user's interest vectors found it (0 for single-vector models)


def _merge(
    labels: np.ndarray,
    scores: np.ndarray,
    interests: np.ndarray,
    banned: np.ndarray,
    k: int,
    larger: bool,
    allowed: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One user's candidates (flattened over interests) -> up to k distinct labels, best score first.

    labels/scores/interests: (n,); banned: sorted int64 labels to drop; allowed: (N,) bool, labels a filter passes."""
    keep = labels >= 0
    if allowed is not None:
        keep &= allowed[labels]  # label -1 reads the last entry, but is already dropped
    if banned.size:
        keep &= ~np.isin(labels, banned, assume_unique=False)
    labels, scores, interests = labels[keep], scores[keep], interests[keep]
    order = np.argsort(-scores if larger else scores, kind="stable")
    labels, scores, interests = labels[order], scores[order], interests[order]
    _, first = np.unique(labels, return_index=True)  # first occurrence = best score of that label
    first = np.sort(first)[:k]
    return labels[first], scores[first], interests[first]


def _sorted_unique(labels: Iterable[int]) -> np.ndarray:
    """Sorted distinct int64 labels (np.unique costs 3x this for the few dozen of a served user's history)."""
    a = np.array(labels if isinstance(labels, (list, np.ndarray)) else list(labels), dtype=np.int64)
    a.sort()
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if a.size > 1 else a


def _take_single(
    labels: np.ndarray,
    scores: np.ndarray,
    users: np.ndarray,
    banned: list[np.ndarray],
    k: int,
    n: int,
    results: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    allowed: np.ndarray | None,
) -> list[int]:
    """One query per user, in one vectorised pass: a single query's hits are already distinct and ordered, so
    dropping padding, excluded labels and labels the filter fails (allowed: (N,) bool) and keeping the first k is
    all the merge there is. labels, scores: (q, width); users: (q,). Fills `results`, returns the users short of k."""
    keep = labels >= 0  # (q, width)
    if allowed is not None:
        keep &= allowed[labels]
    excluded = [u * (n + 1) + 1 + banned[u] for u in users.tolist() if banned[u].size]
    if excluded:  # key = user * (n + 1) + label + 1 is unique per (user, label), padding included
        keys = users[:, None] * (n + 1) + 1 + labels
        gone = np.sort(np.concatenate(excluded))  # the excluded keys
        # membership by binary search: np.isin sorts keys and exclusions together, 5x slower at these sizes
        keep &= gone[np.minimum(np.searchsorted(gone, keys), gone.size - 1)] != keys
    short = []
    zeros = np.zeros(k, dtype=np.int64)
    for r, u in enumerate(users.tolist()):
        sel = keep[r]
        got = labels[r][sel][:k]
        results[u] = (got, scores[r][sel][:k], zeros[: got.size])
        if got.size < k:
            short.append(u)
    return short


def search_vectors(
    index: faiss.Index | Searcher,
    vectors: np.ndarray,
    mask: np.ndarray | None,
    k: int,
    exclude: Sequence[Iterable[int]] | None = None,
    passing: Passing | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Label-level search. vectors: (B, K, D) float32 (or (B, D) for K = 1); mask: (B, K) bool of active interests
    (None = all); exclude: per user, labels to leave out; passing: the labels a filter lets through (index/filter.py),
    shared by the batch. Returns per user (labels, scores, interests), each (<= k,)."""
    index = as_searcher(index)
    if vectors.ndim == 2:
        vectors = vectors[:, None, :]
    b, kk, d = vectors.shape
    if d != index.d:
        raise QuiverError(f"query vectors have dimension {d}, the index has {index.d}")
    if k < 1:
        raise QuiverError(f"k must be at least 1, got {k}")
    if passing is not None and passing.exact:  # few items pass: score exactly those
        return search_exact(gathered(passing, index), index.metric_type, vectors, mask, k, exclude)
    mask = None if mask is None else np.asarray(mask, dtype=bool)
    larger = index.metric_type == faiss.METRIC_INNER_PRODUCT
    banned = [_sorted_unique(e) for e in exclude] if exclude else []
    banned += [np.zeros(0, dtype=np.int64)] * (b - len(banned))
    if kk == 1 and (mask is None or mask.all()):  # a single-vector tower's batch: every row is one query
        owner, interest, single = np.arange(b), np.zeros(b, dtype=np.intp), True
        queries = np.ascontiguousarray(vectors[:, 0], dtype=np.float32)  # (B, D)
    else:
        mask = np.ones((b, kk), dtype=bool) if mask is None else mask
        owner, interest = np.nonzero(mask)  # (Q,) user row and interest slot of each active vector
        queries = np.ascontiguousarray(vectors[owner, interest], dtype=np.float32)  # (Q, D)
        single = bool(mask.sum(axis=1).max(initial=0) <= 1)  # one vector per user: rows need no merging
    n = int(index.ntotal)
    results: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [
        (np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))
    ] * b
    # users still short of k (a user with no active interest gets nothing); np.nonzero lists owners in order, so
    # with one vector per user they are distinct already
    pending = owner if single else np.unique(owner)
    fetch = {int(u): min(n, k + int(banned[u].size)) for u in range(b)}
    allowed, selector, selectivity = None, None, 1.0
    if passing is not None:
        allowed, selectivity = passing.mask, max(passing.count, 1) / max(n, 1)
        if index.selects:
            selector = passing.selector()
        else:  # over-fetch: about fetch passing items expected among fetch / selectivity candidates
            fetch = {u: min(n, int(np.ceil(f * OVERFETCH_MARGIN / selectivity))) for u, f in fetch.items()}
        if passing.count == 0:
            pending = pending[:0]
    attempt = 0
    exhausted: list[int] = []  # users a filtered search left short: scored exactly below
    while pending.size and n > 0:
        # active vectors of the pending users: at first every user with one (np.isin costs ~15 µs a batch)
        rows = np.arange(owner.size) if attempt == 0 else np.nonzero(np.isin(owner, pending))[0]
        width = max(fetch[int(u)] for u in pending)
        scores, labels = index.search(queries[rows], width, attempt, selector, selectivity)  # (q, width)
        if single:
            short = _take_single(labels, scores, owner[rows], banned, k, n, results, allowed)
        else:
            short = []
            for u in pending.tolist():
                sel = owner[rows] == u
                results[u] = _merge(
                    labels[sel].ravel(),
                    scores[sel].ravel(),
                    np.repeat(interest[rows][sel], width),
                    banned[u],
                    k,
                    larger,
                    allowed,
                )
                if results[u][0].size < k:
                    short.append(u)
        widen = width < n or index.can_widen(attempt)
        if passing is not None and (not widen or attempt + 1 >= FILTERED_ATTEMPTS):
            exhausted += short  # a graph walk may not reach every passing item; a few wider tries, then exact
            short = []
        elif not widen:
            short = []
        for u in short:
            fetch[u] = min(n, 2 * width)
        pending = np.asarray(short, dtype=np.int64)
        attempt += 1
    if exhausted:
        assert passing is not None
        users = np.asarray(exhausted)
        exact = search_exact(
            gathered(passing, index),
            index.metric_type,
            vectors[users],
            None if mask is None else mask[users],
            k,
            [banned[u] for u in users],
        )
        for u, got in zip(exhausted, exact, strict=True):
            results[u] = got
    return results


def search(
    bundle: IndexBundle,
    vectors: np.ndarray,
    k: int,
    mask: np.ndarray | None = None,
    exclude: Sequence[Iterable[str]] | None = None,
    passing: Passing | None = None,
) -> list[list[Hit]]:
    """Item-id-level search over an index bundle: per user, up to k hits (exactly k when the catalog allows), best
    first. exclude: per user, item ids to leave out (ids not in the catalog are ignored); passing: a filter's
    labels (index/filter.py)."""
    rows = bundle.row_of() if exclude else {}
    labels = [[rows[i] for i in e if i in rows] for e in exclude] if exclude else None
    out: list[list[Hit]] = []
    for found, scores, interests in search_vectors(bundle.index, vectors, mask, k, labels, passing):
        items = bundle.ids[found]
        out.append([Hit(str(i), float(s), int(j)) for i, s, j in zip(items, scores, interests, strict=True)])
    return out
