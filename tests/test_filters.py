"""Metadata filters (index/filter.py): every operator against brute force on random catalogs, through every index
backend, on both search paths (exact scoring of the passing items, and the filtered index search), with exclusions,
several interests per user, nulls, and filters nothing passes."""

import faiss
import numpy as np
import pyarrow as pa
import pytest

from index.backend import Searcher, build_searcher
from index.factory import parse_spec
from index.filter import Attributes, FilterError
from index.scann_backend import available as scann_available
from index.search import search_vectors
from models.attributes import filterable_columns
from models.errors import QuiverError

N, D, K = 6000, 16, 20
KINDS = {"cat": "categorical", "price": "numeric", "stock": "boolean", "size": "integer"}
FILTERS = [
    {"cat": ["a", "b"]},
    {"cat": ["d"]},
    {"price": {"lt": 10.0}},
    {"price": {"ge": 40, "le": 41}},
    {"price": {"gt": 95}},
    {"stock": True},
    {"stock": False, "cat": ["c"]},
    {"size": [1, 3]},
    {"size": {"ge": 8}},
    {"cat": ["a", "b", "c"], "price": {"lt": 50}, "stock": True},
]


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    """Unit vectors around 60 centres: the structure approximate indexes are built for."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(60, d))
    x = centres[rng.integers(0, 60, n)] + 0.35 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def catalog() -> tuple[np.ndarray, pa.Table]:
    rng = np.random.default_rng(0)
    cat = rng.choice(["a", "b", "c", "d"], N, p=[0.4, 0.3, 0.29, 0.01]).tolist()
    price = rng.uniform(0, 100, N)
    nulls = rng.random(N) < 0.05  # 5% of each column unknown: never passes
    table = pa.table(
        {
            "cat": pa.array([None if z else c for c, z in zip(cat, nulls, strict=True)], pa.string()),
            "price": pa.array(price, mask=np.roll(nulls, 1)),
            "stock": pa.array((rng.random(N) < 0.5).tolist(), mask=np.roll(nulls, 2)),
            "size": pa.array(rng.integers(0, 10, N), mask=np.roll(nulls, 3)),
        }
    )
    return clustered(N, D, 1), table


def brute_mask(table: pa.Table, raw: dict) -> np.ndarray:
    """What a filter means, row by row in plain Python."""
    rows = table.to_pylist()
    ops = {"lt": lambda v, b: v < b, "le": lambda v, b: v <= b, "gt": lambda v, b: v > b, "ge": lambda v, b: v >= b}

    def ok(row: dict) -> bool:
        for col, want in raw.items():
            v = row[col]
            if v is None:
                return False
            if isinstance(want, list) and v not in want:
                return False
            if isinstance(want, dict) and not all(ops[op](v, b) for op, b in want.items()):
                return False
            if isinstance(want, bool) and v is not want:
                return False
        return True

    return np.array([ok(r) for r in rows])


def brute_top(x: np.ndarray, passing: np.ndarray, queries: np.ndarray, k: int, banned=None) -> list[np.ndarray]:
    out = []
    for i, q in enumerate(queries):
        keep = passing.copy()
        if banned is not None:
            keep[banned[i]] = False
        rows = np.flatnonzero(keep)
        scores = x[rows] @ q
        out.append(rows[np.argsort(-scores, kind="stable")[:k]])
    return out


def searchers(x: np.ndarray) -> dict[str, Searcher]:
    made = {}
    for factory, search in [("Flat", {}), ("HNSW32,Flat", {"efSearch": 64}), ("IVF64,SQ8", {"nprobe": 8})]:
        s, _ = build_searcher(parse_spec(factory, D), x, faiss.METRIC_INNER_PRODUCT)
        s.configure(search)
        made[factory] = s
    if scann_available():
        from index.auto import scann_spec

        spec = scann_spec(N, D)
        s, _ = build_searcher(spec, x, faiss.METRIC_INNER_PRODUCT)
        s.configure({"leaves_to_search": max(1, int(spec.params["leaves"]) // 4), "reorder": 200})
        made["ScaNN"] = s
    return made


@pytest.fixture(scope="module")
def indexes(catalog: tuple[np.ndarray, pa.Table]) -> dict[str, Searcher]:
    faiss.omp_set_num_threads(1)
    return searchers(catalog[0])


def test_masks_match_brute_force(catalog: tuple[np.ndarray, pa.Table]) -> None:
    table = catalog[1]
    attrs = Attributes(table, KINDS)
    for raw in FILTERS:
        passing = attrs.passing(attrs.parse(raw), faiss.IndexFlatIP(D), D)
        want = brute_mask(table, raw)
        assert passing.count == int(want.sum()) > 0, raw
        np.testing.assert_array_equal(passing.mask, want)
        np.testing.assert_array_equal(passing.labels, np.flatnonzero(want))


@pytest.mark.parametrize("path", ["exact", "index"])
def test_every_backend_returns_exactly_k_passing_items(
    catalog: tuple[np.ndarray, pa.Table], indexes: dict[str, Searcher], path: str
) -> None:
    """Both search paths, every backend: exactly k results whenever k pass, each passing; exact where the search
    is exact (Flat, or the exact path), near-exact elsewhere."""
    x, table = catalog
    queries = clustered(30, D, 7)
    for name, index in indexes.items():
        attrs = Attributes(table, KINDS, exact_max_floats=10**9 if path == "exact" else 0)
        recalls = []
        for raw in FILTERS:
            passing = attrs.passing(attrs.parse(raw), index, D)
            assert passing.exact == (path == "exact")
            want = brute_top(x, passing.mask, queries, K)
            found = search_vectors(index, queries, None, K, None, passing)
            for (labels, scores, _), truth in zip(found, want, strict=True):
                assert labels.size == min(K, passing.count), (name, raw)
                assert passing.mask[labels].all(), (name, raw)
                assert len(set(labels.tolist())) == labels.size
                assert np.all(np.diff(scores) <= 1e-6)  # best first
                recalls.append(np.intersect1d(labels, truth).size / truth.size)
        exact = (path == "exact" and name != "IVF64,SQ8") or name == "Flat"  # SQ8 gathers decoded vectors
        assert np.mean(recalls) >= (0.999 if exact else 0.9), (name, path, np.mean(recalls))


@pytest.mark.parametrize("path", ["exact", "index"])
def test_exclusions_and_interests_with_a_filter(catalog: tuple[np.ndarray, pa.Table], path: str) -> None:
    """Several interests per user merge (an item keeps its best score) and excluded items never come back."""
    x, table = catalog
    index, _ = build_searcher(parse_spec("Flat"), x, faiss.METRIC_INNER_PRODUCT)
    attrs = Attributes(table, KINDS, exact_max_floats=10**9 if path == "exact" else 0)
    raw = {"cat": ["a", "c"], "stock": True}
    passing = attrs.passing(attrs.parse(raw), index, D)
    vectors = clustered(8 * 3, D, 9).reshape(8, 3, D)
    mask = np.ones((8, 3), dtype=bool)
    mask[::2, 2] = False  # some users have two active interests, others three
    rng = np.random.default_rng(3)
    banned = [rng.choice(np.flatnonzero(passing.mask), 40, replace=False) for _ in range(8)]
    found = search_vectors(index, vectors, mask, K, banned, passing)
    for u, (labels, scores, interests) in enumerate(found):
        active = vectors[u][mask[u]]  # (Ka, D)
        best = (x @ active.T).max(axis=1)  # (N,) each item's best interest score
        keep = passing.mask.copy()
        keep[banned[u]] = False
        truth = np.flatnonzero(keep)[np.argsort(-best[keep], kind="stable")[:K]]
        assert labels.size == K and not np.isin(labels, banned[u]).any() and passing.mask[labels].all()
        assert set(labels.tolist()) == set(truth.tolist())
        np.testing.assert_allclose(scores, best[labels], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(interests, (x[labels] @ active.T).argmax(axis=1))  # masked slots are last


def test_l2_indexes_score_squared_distances(catalog: tuple[np.ndarray, pa.Table]) -> None:
    x, table = catalog
    index, _ = build_searcher(parse_spec("Flat"), x, faiss.METRIC_L2)
    attrs = Attributes(table, KINDS)
    passing = attrs.passing(attrs.parse({"cat": ["d"]}), index, D)
    q = clustered(3, D, 11)
    for (labels, scores, _), query in zip(search_vectors(index, q, None, K, None, passing), q, strict=True):
        dist = ((x[passing.labels] - query) ** 2).sum(axis=1)
        np.testing.assert_array_equal(labels, passing.labels[np.argsort(dist, kind="stable")[:K]])
        np.testing.assert_allclose(scores, np.sort(dist)[:K], rtol=1e-4, atol=1e-5)


def test_a_filter_nothing_passes_answers_empty(catalog: tuple[np.ndarray, pa.Table]) -> None:
    x, table = catalog
    index, _ = build_searcher(parse_spec("HNSW32,Flat", D), x, faiss.METRIC_INNER_PRODUCT)
    for limit in (10**9, 0):
        attrs = Attributes(table, KINDS, exact_max_floats=limit)
        for raw in ({"cat": ["no-such-category"]}, {"price": {"gt": 1000}}, {"size": [42]}):
            passing = attrs.passing(attrs.parse(raw), index, D)
            assert passing.count == 0
            assert all(labels.size == 0 for labels, _, _ in search_vectors(index, x[:2], None, K, None, passing))


def test_equal_filters_share_one_cache_entry(catalog: tuple[np.ndarray, pa.Table]) -> None:
    _, table = catalog
    attrs = Attributes(table, KINDS)
    a = attrs.parse({"cat": ["b", "a"], "price": {"lt": 5, "gt": 1}})
    b = attrs.parse({"price": {"gt": 1.0, "lt": 5.0}, "cat": ["a", "b", "a"]})
    assert a == b and a.key == b.key
    index = faiss.IndexFlatIP(D)
    assert attrs.passing(a, index, D) is attrs.passing(b, index, D)


@pytest.mark.parametrize(
    ("raw", "column", "words"),
    [
        ({"colour": ["red"]}, "colour", "not a filterable column"),
        ({"cat": {"lt": 3}}, "cat", "not a range"),
        ({"cat": True}, "cat", "not true / false"),
        ({"cat": [1, 2]}, "cat", "values are strings"),
        ({"cat": []}, "cat", "empty list"),
        ({"price": ["cheap"]}, "price", "not a list"),
        ({"price": {"below": 3}}, "price", "unknown range operator"),
        ({"price": {}}, "price", "at least one"),
        ({"price": {"lt": True}}, "price", "finite numbers"),
        ({"price": {"lt": float("nan")}}, "price", "finite numbers"),
        ({"size": ["3"]}, "size", "values are integers"),
        ({"size": [True]}, "size", "values are integers"),
        ({"stock": ["yes"]}, "stock", "not a list"),
        ({"stock": 1}, "stock", "true or false"),
    ],
)
def test_bad_filters_are_refused_naming_the_column(
    catalog: tuple[np.ndarray, pa.Table], raw: dict, column: str, words: str
) -> None:
    attrs = Attributes(catalog[1], KINDS)
    with pytest.raises(FilterError, match=words) as err:
        attrs.parse(raw)
    assert err.value.column == column


def test_filterable_columns_are_typed_and_checked() -> None:
    table = pa.table(
        {
            "item_id": ["i1", "i2"],
            "popularity": [3, 1],
            "cat": ["a", "b"],
            "price": [1.5, 2.0],
            "stock": [True, False],
            "size": pa.array([1, 2], pa.int16()),
            "tags": pa.array([["x"], []], pa.list_(pa.string())),
        }
    )
    kinds = {"cat": "categorical", "price": "numeric", "stock": "boolean", "size": "integer"}
    assert filterable_columns(table) == kinds
    assert filterable_columns(table, ["price"]) == {"price": "numeric"}
    with pytest.raises(QuiverError, match=r"output\.filterable: 'colour' is not an attribute column"):
        filterable_columns(table, ["colour"], "output.filterable")
    with pytest.raises(QuiverError, match="'tags' has type list<item: string>"):
        filterable_columns(table, ["tags"], "output.filterable")
    with pytest.raises(QuiverError, match="item_id"):
        filterable_columns(table, ["item_id"])
