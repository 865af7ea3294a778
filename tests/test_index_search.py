"""Multi-interest search (DESIGN §7), hand-checked on tiny 2-d vectors: one FAISS call per round, per-user merge
(dedupe, best score and its interest kept), exclusion, over-fetch so exactly k come back, never a -1."""

import faiss
import numpy as np
import pytest

from index.bundle import IndexBundle, ids_array
from index.factory import empty_index, parse_spec
from index.search import search, search_vectors
from models.errors import QuiverError

# label: vector            score vs a=[1,0] / b=[0,1]
ITEMS = np.array(
    [
        [1.0, 0.0],  # 0: a 1.00  b 0.00
        [0.8, 0.1],  # 1: a 0.80  b 0.10
        [0.0, 0.95],  # 2: a 0.00  b 0.95
        [0.1, 0.85],  # 3: a 0.10  b 0.85
        [-1.0, 0.0],  # 4: a -1.0  b 0.00
        [0.6, 0.7],  # 5: a 0.60  b 0.70  (found by both; b's score wins)
    ],
    dtype=np.float32,
)
USER = np.array([[[1.0, 0.0], [0.0, 1.0]]], dtype=np.float32)  # (1, 2, 2): interests a, b


def _flat(vectors: np.ndarray) -> faiss.Index:
    index = empty_index(parse_spec("Flat"), vectors.shape[1], faiss.METRIC_INNER_PRODUCT)
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    return index


def _bundle(index: faiss.Index, n: int) -> IndexBundle:
    manifest = {"version": "v", "name": "t", "model": {"name": "m", "version": "mv"}, "dim": index.d}
    return IndexBundle(path=None, manifest=manifest, index=index, ids=ids_array([f"i{j}" for j in range(n)]))  # type: ignore[arg-type]


def test_merge_keeps_best_score_and_its_interest() -> None:
    ((labels, scores, interests),) = search_vectors(_flat(ITEMS), USER, None, k=5)
    assert labels.tolist() == [0, 2, 3, 1, 5]
    np.testing.assert_allclose(scores, [1.0, 0.95, 0.85, 0.8, 0.7], rtol=1e-6)
    assert interests.tolist() == [0, 1, 1, 0, 1]


def test_every_item_once_even_when_k_exceeds_each_interest_share() -> None:
    ((labels, scores, _),) = search_vectors(_flat(ITEMS), USER, None, k=6)
    assert sorted(labels.tolist()) == list(range(6))
    assert scores[-1] == pytest.approx(0.0)  # item 4: best of -1 (a) and 0 (b)


def test_exclusion_overfetches_to_exactly_k() -> None:
    # 0 and 3 are excluded: 4 items must still come back, which needs every row of the catalog (k + 2 = 6).
    ((labels, _, _),) = search_vectors(_flat(ITEMS), USER, None, k=4, exclude=[[0, 3]])
    assert labels.tolist() == [2, 1, 5, 4]


def test_k_beyond_catalog_returns_what_exists_and_no_padding() -> None:
    ((labels, scores, _),) = search_vectors(_flat(ITEMS), USER, None, k=50, exclude=[[1]])
    assert sorted(labels.tolist()) == [0, 2, 3, 4, 5]
    assert (labels >= 0).all() and np.isfinite(scores).all()


def test_inactive_interest_is_not_searched() -> None:
    mask = np.array([[True, False]])
    ((labels, _, interests),) = search_vectors(_flat(ITEMS), USER, mask, k=3)
    assert labels.tolist() == [0, 1, 5]  # a's order only: 1.0, 0.8, 0.6
    assert set(interests.tolist()) == {0}


def test_batch_of_users_each_merged_separately() -> None:
    users = np.array([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, 0.0]]], dtype=np.float32)  # (2, 2, 2)
    mask = np.array([[True, True], [True, False]])
    got = search_vectors(_flat(ITEMS), users, mask, k=2, exclude=[[], [4]])
    assert got[0][0].tolist() == [0, 2]
    assert got[1][0].tolist() == [2, 3]  # -x: 2 (0.0) then 3 (-0.1) beat 5 (-0.6); 4 (1.0) excluded
    assert got[1][1][0] == pytest.approx(0.0) and got[1][1][1] == pytest.approx(-0.1)


def test_item_ids_and_unknown_exclusions() -> None:
    bundle = _bundle(_flat(ITEMS), len(ITEMS))
    (hits,) = search(bundle, USER, k=3, exclude=[["i0", "not-in-catalog", "i0"]])
    assert [h.item_id for h in hits] == ["i2", "i3", "i1"]
    assert [h.interest for h in hits] == [1, 1, 0]


def test_ivf_with_too_few_probes_still_returns_k() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = empty_index(parse_spec("IVF32,Flat"), 8, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add_with_ids(x, np.arange(400, dtype=np.int64))
    index.nprobe = 1  # one list holds ~12 items: a plain search for 60 pads with -1
    _, raw = index.search(x[:3], 60)
    assert (raw < 0).any()
    got = search_vectors(index, x[:3], None, k=60, exclude=[[0, 1, 2]] * 3)
    for labels, scores, _ in got:
        assert labels.size == 60 and (labels >= 0).all() and len(set(labels.tolist())) == 60
        assert not set(labels.tolist()) & {0, 1, 2}
        assert np.all(np.diff(scores) <= 1e-6)  # best first


def test_hnsw_returns_k_even_with_small_ef() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    index = empty_index(parse_spec("HNSW8"), 8, faiss.METRIC_INNER_PRODUCT)
    index.add_with_ids(x, np.arange(600, dtype=np.int64))
    faiss.downcast_index(index.index).hnsw.efSearch = 4
    ((labels, _, _),) = search_vectors(index, x[:1], None, k=300)
    assert labels.size == 300 and (labels >= 0).all() and len(set(labels.tolist())) == 300


def test_wrong_dimension_is_refused() -> None:
    with pytest.raises(QuiverError, match="dimension 3"):
        search_vectors(_flat(ITEMS), np.zeros((1, 1, 3), np.float32), None, k=2)
