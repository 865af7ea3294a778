"""Metadata filters over the served items: parse a request's filter against the index bundle's attribute columns,
turn it into the set of labels that pass, and search only among them (DESIGN §7, filters).

    {"category": ["Beauty", "Nails"], "price": {"lt": 20}, "in_stock": true}

Every clause must hold (AND); a categorical or integer column takes any of a list of values, an integer or numeric
column a range (`lt`, `le`, `gt`, `ge`, all that are given must hold), a boolean column one value. A missing
(null) attribute never passes. Columns and their kinds come from the bundle (index/attributes.py), so a filter on a
column the bundle does not record, or a value of the wrong type, is refused naming the column.

Which labels pass is computed once per distinct filter and kept in a small LRU (shops filter on a handful of
category pages and flags, so the same filters come back): per categorical value the sorted labels holding it are
precomputed at load (an inverted list: the any-of is their union), numeric and boolean columns are held as arrays.

Search, by how many items pass (`Passing.exact`):
- few (their vectors fit in `EXACT_MAX_FLOATS`): exact scoring of just those items, their vectors gathered once per
  filter and cached; exact, and cheaper than any index at that size;
- many: the index search itself, restricted inside the search where the backend can (FAISS: an `IDSelectorBitmap`,
  with HNSW's candidate list widened by 1 / selectivity so that enough passing items are met), else (ScaNN) by
  over-fetching k / selectivity candidates, re-scored exactly from reorder / selectivity (the k passing items are
  among the best k / selectivity, so the re-scoring depth that reaches the recall floor unfiltered must grow by the
  same factor: at 10% passing, recall 0.81 without it, 0.98 with it), and dropping the ones that fail.
  index/search.py's widening loop goes on until k passing items are found or the catalog is exhausted, so either
  way the answer holds exactly k items whenever k pass.
"""

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index.backend import Searcher, as_searcher
from models.attributes import Kind
from models.errors import QuiverError

RANGE_OPS = ("lt", "le", "gt", "ge")
# Exact scoring of the passing items up to 20,000 x 64 floats (5 MB per cached filter, ~0.3 ms a query on one core):
# past that an index search is cheaper (at 1M items: 1% passing is scored exactly, 10% goes through the index).
EXACT_MAX_FLOATS = 20_000 * 64
CACHE_FILTERS = 64  # distinct filters whose passing labels (and gathered vectors) are kept ...
CACHE_BYTES = 256 << 20  # ... within this many bytes (a 1M-item mask is 1 MB, its labels up to 8 MB)


class FilterError(QuiverError):
    """A filter the bundle cannot apply; `column` names the offending key (None: the filter as a whole)."""

    def __init__(self, column: str | None, message: str) -> None:
        super().__init__(message)
        self.column = column


Clause = tuple[str, str, Any]  # (column, "in" | "range" | "is", values | ((op, bound), ...) | bool)


@dataclass(frozen=True)
class Filter:
    """A parsed filter in canonical form: equal filters have equal keys, whatever order the request wrote them in."""

    clauses: tuple[Clause, ...]

    @property
    def key(self) -> tuple[Clause, ...]:
        return self.clauses


@dataclass
class Passing:
    """The labels that pass one filter over one index, and what its search needs (built once, cached)."""

    mask: np.ndarray  # (N,) bool over labels
    labels: np.ndarray  # (P,) int64, sorted
    exact: bool  # few enough to score exactly
    vectors: np.ndarray | None = None  # (P, D) float32, gathered on the first exact search
    norms: np.ndarray | None = None  # (P,) squared norms, for L2
    _selector: Any = field(default=None, repr=False)  # faiss.IDSelectorBitmap over the mask, built on first use
    _bits: np.ndarray | None = field(default=None, repr=False)  # the selector's bitmap, kept alive with it

    @property
    def count(self) -> int:
        return int(self.labels.size)

    @property
    def nbytes(self) -> int:
        held = (self.mask, self.labels, self.vectors, self.norms, self._bits)
        return sum(a.nbytes for a in held if a is not None)

    def selector(self) -> Any:
        """The mask as a FAISS IDSelectorBitmap (label i passes when bit i is set), for searches that select."""
        if self._selector is None:
            self._bits = np.packbits(self.mask, bitorder="little")
            self._selector = faiss.IDSelectorBitmap(self.mask.size, faiss.swig_ptr(self._bits))
        return self._selector


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class Attributes:
    """The attribute columns of one served index, arranged for filtering (built at load, read-only after)."""

    def __init__(
        self, table: pa.Table | None, kinds: dict[str, Kind], exact_max_floats: int = EXACT_MAX_FLOATS
    ) -> None:
        self.kinds = dict(kinds)
        self.table = table
        self.exact_max_floats = exact_max_floats
        self.n = table.num_rows if table is not None else 0
        self.postings: dict[str, dict[Any, np.ndarray]] = {}  # categorical / integer: value -> sorted labels
        self.values: dict[str, np.ndarray] = {}  # integer / numeric: (N,) float64, NaN = null
        self.flags: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # boolean: (N,) value, (N,) not null
        self._cache: OrderedDict[tuple[Clause, ...], Passing] = OrderedDict()
        self._lock = threading.Lock()
        if table is None:
            return
        for name, kind in self.kinds.items():
            column = table.column(name)
            if kind in ("categorical", "integer"):
                self.postings[name] = self._inverted(column)
            if kind in ("integer", "numeric"):
                self.values[name] = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
            if kind == "boolean":
                valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
                self.flags[name] = (pc.fill_null(column, False).to_numpy(zero_copy_only=False), valid)

    @staticmethod
    def _inverted(column: pa.ChunkedArray) -> dict[Any, np.ndarray]:
        encoded = pc.dictionary_encode(column).combine_chunks()  # codes (N,) over the distinct values
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        codes = np.where(pc.is_valid(encoded.indices).to_numpy(zero_copy_only=False), codes, -1).astype(np.int64)
        order = np.argsort(codes, kind="stable")  # labels grouped by value, ascending within a value
        bounds = np.searchsorted(codes[order], np.arange(len(encoded.dictionary) + 1))
        values = encoded.dictionary.to_pylist()
        return {v: order[bounds[i] : bounds[i + 1]] for i, v in enumerate(values)}

    def row(self, label: int) -> dict[str, Any]:
        """One item's filterable values (empty when the index records none)."""
        if self.table is None or not self.kinds:
            return {}
        return self.table.select(list(self.kinds)).slice(label, 1).to_pylist()[0]

    def parse(self, raw: dict[str, Any]) -> Filter:
        """The request's filter in canonical form, refused (FilterError naming the column) where it cannot apply."""
        clauses: list[Clause] = []
        for name, value in raw.items():
            kind = self.kinds.get(name)
            if kind is None:
                have = ", ".join(f"{c} ({k})" for c, k in self.kinds.items()) or "none"
                raise FilterError(name, f"not a filterable column of the served index (filterable: {have})")
            clauses.append(self._clause(name, kind, value))
        return Filter(tuple(sorted(clauses, key=lambda c: c[0])))

    @staticmethod
    def _clause(name: str, kind: Kind, value: Any) -> Clause:
        if isinstance(value, list):
            if kind not in ("categorical", "integer"):
                raise FilterError(name, f"a {kind} column takes {_form(kind)}, not a list of values")
            if not value:
                raise FilterError(name, "an empty list of values: nothing could pass")
            want, ok = ("strings", lambda v: isinstance(v, str)) if kind == "categorical" else ("integers", _is_int)
            wrong = [v for v in value if not ok(v)]
            if wrong:
                raise FilterError(name, f"a {kind} column's values are {want}, got {wrong[0]!r}")
            return (name, "in", tuple(sorted(set(value))))
        if isinstance(value, dict):
            if kind not in ("integer", "numeric"):
                raise FilterError(name, f"a {kind} column takes {_form(kind)}, not a range")
            bad = [op for op in value if op not in RANGE_OPS]
            if bad:
                raise FilterError(name, f"unknown range operator {bad[0]!r} (use {', '.join(RANGE_OPS)})")
            given = {op: v for op, v in value.items() if v is not None}
            if not given:
                raise FilterError(name, f"a range needs at least one of {', '.join(RANGE_OPS)}")
            if any(not _is_number(v) or not np.isfinite(v) for v in given.values()):
                raise FilterError(name, "range bounds must be finite numbers")
            return (name, "range", tuple((op, float(v)) for op, v in sorted(given.items())))
        if isinstance(value, bool):
            if kind != "boolean":
                raise FilterError(name, f"a {kind} column takes {_form(kind)}, not true / false")
            return (name, "is", value)
        raise FilterError(name, f"a {kind} column takes {_form(kind)}")

    def _mask(self, flt: Filter) -> np.ndarray:
        mask = np.ones(self.n, dtype=bool)
        for name, op, arg in flt.clauses:
            if op == "in":
                postings = self.postings[name]
                if self.kinds[name] == "integer":
                    arg = tuple(int(v) for v in arg)
                hit = np.zeros(self.n, dtype=bool)
                for v in arg:
                    rows = postings.get(v)
                    if rows is not None:
                        hit[rows] = True
                mask &= hit
            elif op == "range":
                col = self.values[name]
                with np.errstate(invalid="ignore"):  # NaN (null) compares false: never passes
                    for cmp, bound in arg:
                        mask &= {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal}[cmp](
                            col, bound
                        )
            else:
                value, valid = self.flags[name]
                mask &= valid & (value == arg)
        return mask

    def passing(self, flt: Filter, index: "faiss.Index | Searcher", dim: int) -> Passing:
        """The labels passing `flt` (cached per filter), with a FAISS selector when the search will need one. One
        Attributes serves one index: the cached gathered vectors are that index's."""
        with self._lock:
            hit = self._cache.get(flt.key)
            if hit is not None:
                self._cache.move_to_end(flt.key)
                return hit
        mask = self._mask(flt)
        labels = np.flatnonzero(mask).astype(np.int64)
        found = Passing(mask, labels, exact=labels.size * dim <= self.exact_max_floats)
        if not found.exact and as_searcher(index).selects:
            found.selector()  # built here, once, rather than inside a timed search
        with self._lock:
            self._cache[flt.key] = found
            while len(self._cache) > 1 and (
                len(self._cache) > CACHE_FILTERS or sum(p.nbytes for p in self._cache.values()) > CACHE_BYTES
            ):
                self._cache.popitem(last=False)
        return found


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _form(kind: Kind) -> str:
    return {
        "categorical": "a list of string values (any of them passes)",
        "integer": "a list of integer values or a range {lt, le, gt, ge}",
        "numeric": "a range {lt, le, gt, ge}",
        "boolean": "true or false",
    }[kind]


def gathered(passing: Passing, index: "faiss.Index | Searcher") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels (P,), vectors (P, D) float32, squared norms (P,)) of the passing items, read from the index (exact
    vectors for Flat / HNSW / ScaNN, decoded codes for SQ / PQ layouts). Kept with the cached filter when few pass;
    read afresh (not kept) for a large set, which only a search left short by heavy exclusions needs."""
    if passing.vectors is not None and passing.norms is not None:
        return passing.labels, passing.vectors, passing.norms
    vectors = np.ascontiguousarray(as_searcher(index).vectors(passing.labels), dtype=np.float32)
    norms = (vectors**2).sum(axis=1)
    if passing.exact:
        passing.vectors, passing.norms = vectors, norms
    return passing.labels, vectors, norms


def search_exact(
    items: tuple[np.ndarray, np.ndarray, np.ndarray],
    metric: int,
    vectors: np.ndarray,
    mask: np.ndarray | None,
    k: int,
    exclude: Sequence[Iterable[int]] | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Exact top-k among `items` (gathered()'s labels, vectors, norms), per user over all active interests (an item
    keeps its best score and the interest that gave it). vectors (B, K, D); returns per user (labels, scores,
    interests), best first."""
    item_labels, item_vectors, item_norms = items
    if vectors.ndim == 2:
        vectors = vectors[:, None, :]
    b, kk, _ = vectors.shape
    mask = np.ones((b, kk), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    larger = metric == faiss.METRIC_INNER_PRODUCT
    owner, interest = np.nonzero(mask)
    queries = np.ascontiguousarray(vectors[owner, interest], dtype=np.float32)  # (Q, D)
    scores = queries @ item_vectors.T  # (Q, P)
    if not larger:  # squared L2, FAISS's convention
        scores = item_norms[None, :] - 2 * scores + (queries**2).sum(axis=1, keepdims=True)
    out = []
    for u in range(b):
        rows = np.flatnonzero(owner == u)
        if rows.size == 0:
            out.append((np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)))
            continue
        if rows.size == 1:
            best, user_scores = np.zeros(scores.shape[1], dtype=np.int64), scores[rows[0]]
        else:  # an item keeps the interest that scores it best
            best = scores[rows].argmax(axis=0) if larger else scores[rows].argmin(axis=0)  # (P,)
            user_scores = scores[rows[best], np.arange(scores.shape[1])]  # (P,)
        keep = np.ones(item_labels.size, dtype=bool)
        banned = np.fromiter(exclude[u], dtype=np.int64) if exclude and u < len(exclude) else None
        if banned is not None and banned.size:
            keep &= ~np.isin(item_labels, banned)
        cand = np.flatnonzero(keep)
        key = -user_scores[cand] if larger else user_scores[cand]
        if cand.size > k:
            part = np.argpartition(key, k - 1)[:k]
            cand, key = cand[part], key[part]
        top = cand[np.argsort(key, kind="stable")]
        out.append((item_labels[top], user_scores[top].astype(np.float32), interest[rows[best[top]]]))
    return out
