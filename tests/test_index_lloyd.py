"""Lloyd steps over the whole catalog for IVF centroids (index/lloyd.py) and where builds apply them."""

import faiss
import numpy as np
import pytest

from index.backend import build_searcher
from index.factory import build_index, parse_spec, refines
from index.lloyd import LLOYD_STEPS, lloyd_steps


def _clusters(n_per: int, centres: np.ndarray, spread: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    points = [c + spread * rng.standard_normal((n_per, centres.shape[1])) for c in centres]
    return np.concatenate(points).astype(np.float32)


def test_a_step_moves_each_centroid_to_the_mean_of_the_items_it_is_nearest_to() -> None:
    catalog = _clusters(200, np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]), 0.5)
    start = np.array([[1.0, 1.0], [9.0, 1.0], [1.0, 9.0], [100.0, 100.0]], dtype=np.float32)  # the last: nobody's
    got = lloyd_steps(start, catalog, faiss.METRIC_L2, steps=1)
    nearest = ((catalog[:, None, :] - start[None]) ** 2).sum(-1).argmin(1)
    for j in range(3):
        np.testing.assert_allclose(got[j], catalog[nearest == j].mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[3], start[3])  # a list no item chose keeps its centroid
    assert start[0, 0] == 1.0  # the caller's centroids are left as they were
    assert got.dtype == np.float32 and got.shape == start.shape


def test_inner_product_assigns_by_score_and_keeps_plain_means() -> None:
    # (0.5, 0) and (0.5, 0.1) are nearer (0, 0.4) in L2 but score higher with (3, 0): inner product must decide
    catalog = np.array([[0.5, 0.0], [0.5, 0.1], [0.0, 1.0]], dtype=np.float32)
    start = np.array([[3.0, 0.0], [0.0, 0.4]], dtype=np.float32)
    got = lloyd_steps(start, catalog, faiss.METRIC_INNER_PRODUCT, steps=1)
    np.testing.assert_allclose(got[0], [0.5, 0.05], atol=1e-6)  # not normalised: q . mean is the list's mean score
    np.testing.assert_allclose(got[1], [0.0, 1.0], atol=1e-6)
    by_l2 = lloyd_steps(start, catalog, faiss.METRIC_L2, steps=1)
    np.testing.assert_allclose(by_l2[0], [3.0, 0.0], atol=1e-6)  # in L2 nobody chose it


def test_steps_reach_the_fixed_point_from_a_poor_start() -> None:
    centres = np.array([[0.0, 0.0], [6.0, 0.0]])
    catalog = _clusters(300, centres, 0.4, seed=1)
    got = lloyd_steps(np.array([[2.0, 0.0], [3.0, 0.0]], dtype=np.float32), catalog, faiss.METRIC_L2, steps=5)
    np.testing.assert_allclose(np.sort(got[:, 0]), [0.0, 6.0], atol=0.1)


def test_chunks_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = _clusters(500, np.random.default_rng(3).standard_normal((8, 4)) * 5, 1.0, seed=2)
    start = catalog[:: len(catalog) // 8][:8].copy()
    whole = lloyd_steps(start, catalog, faiss.METRIC_L2, steps=2)
    monkeypatch.setattr("index.lloyd.CHUNK", 37)
    np.testing.assert_allclose(lloyd_steps(start, catalog, faiss.METRIC_L2, steps=2), whole, rtol=1e-5, atol=1e-5)


def test_refines_only_in_memory_cpu_ivf_builds_larger_than_their_sample() -> None:
    ivf = parse_spec("IVF16,SQ8")
    assert refines(ivf, 10_000, on_gpu=False)
    assert not refines(ivf, 16 * 64, on_gpu=False)  # the sample is the whole catalog: k-means saw every item
    assert not refines(ivf, 10_000, on_gpu=True)
    assert not refines(parse_spec("HNSW16"), 10_000, on_gpu=False)
    assert not refines(parse_spec("Flat"), 10_000, on_gpu=False)


def test_an_in_memory_build_serves_the_refined_centroids() -> None:
    """build_searcher's IVF centroids = FAISS's k-means on the sample, then LLOYD_STEPS steps over every item."""
    faiss.omp_set_num_threads(1)  # k-means sums in a fixed order: both builds train alike
    catalog = _clusters(400, np.random.default_rng(5).standard_normal((40, 8)) * 3, 1.0, seed=4)  # 16,000 items
    spec = parse_spec("IVF16,SQ8")
    refined, _ = build_searcher(spec, catalog, faiss.METRIC_L2, gpu=False, seed=0)
    rows = np.sort(np.random.default_rng(0).choice(len(catalog), size=spec.sample_size(len(catalog)), replace=False))
    plain, _ = build_index(spec, 8, faiss.METRIC_L2, [], catalog[rows], gpu=False)  # streamed: no catalog, no steps
    ivf_plain, ivf_refined = faiss.extract_index_ivf(plain), faiss.extract_index_ivf(refined.index)
    start = ivf_plain.quantizer.reconstruct_n(0, 16)
    want = lloyd_steps(start, catalog, faiss.METRIC_L2, LLOYD_STEPS)
    np.testing.assert_allclose(ivf_refined.quantizer.reconstruct_n(0, 16), want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(want, start, atol=1e-3)  # the steps moved them
    assert refined.ntotal == len(catalog) and ivf_refined.is_trained
    # every item is in the list of its nearest refined centroid, and exact search over all lists still finds it
    ivf_refined.nprobe = 16
    _, labels = refined.search(catalog[:50], 1)
    np.testing.assert_array_equal(labels[:, 0], np.arange(50))
