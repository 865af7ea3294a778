"""Tests for training/ranking.py: full-catalog top-k, ranking metrics, the sampled protocol, popularity."""

import math

import numpy as np
import pytest
import torch

from models.errors import QuiverError
from training.ranking import (
    Csr,
    first_hit_ranks,
    full_ranking_metrics,
    popularity_scores,
    popularity_top_k,
    sampled_metrics,
    sampled_ranks,
    top_k_items,
)


def _empty_csr(n_rows: int) -> Csr:
    return Csr.from_pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), n_rows)


# ---- Csr ----------------------------------------------------------------------------------------------------------


def test_csr_from_pairs_groups_sorts_and_dedupes() -> None:
    csr = Csr.from_pairs(np.array([2, 0, 2, 0, 2]), np.array([5, 3, 1, 3, 4]), n_rows=4)
    assert csr.indptr.tolist() == [0, 1, 1, 4, 4]
    assert csr.row(0).tolist() == [3]  # the duplicate (0, 3) collapses
    assert csr.row(1).tolist() == []
    assert csr.row(2).tolist() == [1, 4, 5]
    assert csr.row(3).tolist() == []
    assert csr.n_rows == 4


def test_csr_rejects_bad_rows_and_indptr() -> None:
    with pytest.raises(QuiverError, match="row ids"):
        Csr.from_pairs(np.array([0, 3]), np.array([1, 1]), n_rows=3)
    with pytest.raises(QuiverError, match="indptr"):
        Csr(indptr=np.array([0, 2, 1]), indices=np.array([0]))


# ---- full-catalog metrics -----------------------------------------------------------------------------------------


def test_full_ranking_metrics_hand_computed() -> None:
    # user 0: truth {1, 4}, ranked [4, 2, 1] -> hits at ranks 1 and 3.
    #   K=1: recall 1/2, HR 1, DCG 1, IDCG (min(2,1)=1 position) 1 -> NDCG 1
    #   K=3: recall 2/2, HR 1, DCG 1 + 1/log2(4) = 1.5, IDCG 1 + 1/log2(3) = 1.6309 -> NDCG 0.919721
    # user 1: truth {7}, ranked [0, 2, 3] -> no hit: all zero at both K.
    # user 2: truth {5}, ranked [6, 5, -1] -> hit at rank 2 (K=3 exceeds |truth| = 1).
    #   K=1: all zero.  K=3: recall 1, HR 1, DCG 1/log2(3) = 0.630930, IDCG (one position) 1 -> NDCG 0.630930
    # user 3: no truth -> skipped.
    # Means over 3 users: K=1: recall 1/6, HR 1/3, NDCG 1/3.
    #                     K=3: recall 2/3, HR 2/3, NDCG (0.919721 + 0 + 0.630930) / 3 = 0.516884
    top = np.array([[4, 2, 1], [0, 2, 3], [6, 5, -1], [1, 2, 3]])
    truth = Csr.from_pairs(np.array([0, 0, 1, 2]), np.array([1, 4, 7, 5]), n_rows=4)
    got = full_ranking_metrics(top, truth, [1, 3])
    assert got["users"] == 3
    assert got["Recall@1"] == pytest.approx(1 / 6)
    assert got["HR@1"] == pytest.approx(1 / 3)
    assert got["NDCG@1"] == pytest.approx(1 / 3)
    assert got["Recall@3"] == pytest.approx(2 / 3)
    assert got["HR@3"] == pytest.approx(2 / 3)
    assert got["NDCG@3"] == pytest.approx(0.5168835, abs=1e-6)


def test_first_hit_ranks_hand_computed() -> None:
    # Same rankings as above: user 0's first truth item (4) is at rank 1; user 1 has none ranked -> kmax + 1 = 4;
    # user 2's is at rank 2; user 3 has no truth at all -> 4.
    top = np.array([[4, 2, 1], [0, 2, 3], [6, 5, -1], [1, 2, 3]])
    truth = Csr.from_pairs(np.array([0, 0, 1, 2]), np.array([1, 4, 7, 5]), n_rows=4)
    ranks = first_hit_ranks(top, truth)
    assert ranks.tolist() == [1, 4, 2, 4]
    # HR@K is the share of users (with truth) whose first hit is within K.
    for k in (1, 2, 3):
        assert np.mean(ranks[:3] <= k) == pytest.approx(full_ranking_metrics(top, truth, [k])[f"HR@{k}"])


def test_full_ranking_metrics_perfect_ranking_with_more_truth_than_k() -> None:
    # 3 truth items, K=2, both slots hit: recall 2/3 but NDCG 1 (IDCG over min(3, 2) = 2 positions).
    top = np.array([[9, 8]])
    truth = Csr.from_pairs(np.array([0, 0, 0]), np.array([7, 8, 9]), n_rows=1)
    got = full_ranking_metrics(top, truth, [2])
    assert got["Recall@2"] == pytest.approx(2 / 3)
    assert got["NDCG@2"] == pytest.approx(1.0)
    assert got["HR@2"] == 1.0


def test_full_ranking_metrics_rejects_k_beyond_depth_and_no_truth() -> None:
    top = np.array([[0, 1]])
    with pytest.raises(QuiverError, match="K"):
        full_ranking_metrics(top, Csr.from_pairs(np.array([0]), np.array([0]), 1), [3])
    with pytest.raises(QuiverError, match="ground-truth"):
        full_ranking_metrics(top, _empty_csr(1), [1])


# ---- top_k_items --------------------------------------------------------------------------------------------------


def test_top_k_exclusion_removes_the_best_item() -> None:
    items = torch.tensor([[10.0], [3.0], [2.0], [1.0]])  # item 0 scores highest for a positive user
    users = torch.tensor([[1.0], [1.0]])
    exclude = Csr.from_pairs(np.array([0]), np.array([0]), n_rows=2)  # only user 0 has item 0 in training
    scores, rows = top_k_items(users, items, exclude, k=3)
    assert rows.tolist() == [[1, 2, 3], [0, 1, 2]]
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    assert scores[0].tolist() == [3.0, 2.0, 1.0]
    assert 0 not in rows[0]


def test_top_k_multi_interest_merge_keeps_best_score_and_dedupes() -> None:
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.6], [-1.0, -1.0]])
    # user 0, interest a = [2, 0]: scores [2, 0, 1.2, -2] -> top-3 items 0 (2), 2 (1.2), 1 (0)
    #         interest b = [0, 1]: scores [0, 1, 0.6, -1] -> top-3 items 1 (1), 2 (0.6), 0 (0)
    #   merge, best score per item: 0 -> 2, 2 -> 1.2 (not 0.6), 1 -> 1 (not 0); each item once.
    # user 1: interest b = [0, 5] is masked out, so item 1 (which it would score 5) must not win.
    users = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 5.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    scores, rows = top_k_items(users, items, _empty_csr(2), k=3, interest_mask=mask)
    assert rows[0].tolist() == [0, 2, 1]
    assert scores[0] == pytest.approx([2.0, 1.2, 1.0])
    assert rows[1].tolist() == [0, 2, 1]
    assert scores[1] == pytest.approx([2.0, 1.2, 0.0])


def test_top_k_all_interests_masked_gives_only_padding() -> None:
    users = torch.ones((1, 2, 3))
    items = torch.ones((4, 3))
    scores, rows = top_k_items(users, items, _empty_csr(1), k=2, interest_mask=torch.zeros((1, 2), dtype=torch.bool))
    assert rows.tolist() == [[-1, -1]]
    assert np.isneginf(scores).all()


@pytest.mark.parametrize("multi", [False, True])
def test_top_k_chunking_matches_single_chunk(multi: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    n_users, n_items, dim = 37, 50, 8
    users = torch.randn((n_users, 3, dim) if multi else (n_users, dim), generator=gen)
    mask = torch.rand((n_users, 3), generator=gen) > 0.3 if multi else None
    items = torch.randn((n_items, dim), generator=gen)
    rng = np.random.default_rng(0)
    exclude = Csr.from_pairs(rng.integers(0, n_users, 200), rng.integers(0, n_items, 200), n_users)
    whole = top_k_items(users, items, exclude, k=10, interest_mask=mask, chunk_size=1000)
    for chunk in (1, 7):
        part = top_k_items(users, items, exclude, k=10, interest_mask=mask, chunk_size=chunk)
        np.testing.assert_array_equal(part[1], whole[1])
        # BLAS may sum in a different order for a different number of rows: scores agree to float32 rounding
        np.testing.assert_allclose(part[0], whole[0], rtol=1e-6, atol=1e-6)
    # and the single chunk matches a brute-force ranking
    if multi:  # (U, K, I) per-interest scores, masked interests dropped, best interest per item
        dense = (users @ items.T).masked_fill(~mask[..., None], -math.inf).amax(1).numpy()
    else:
        dense = (users @ items.T).numpy()
    for u in range(n_users):
        dense[u, exclude.row(u)] = -np.inf
    expected = np.argsort(-dense, axis=1, kind="stable")[:, :10]
    expected_scores = np.take_along_axis(dense, expected, axis=1)
    expected = np.where(np.isneginf(expected_scores), -1, expected)
    np.testing.assert_array_equal(whole[1], expected)


def test_top_k_pads_when_catalog_is_exhausted() -> None:
    items = torch.tensor([[4.0], [3.0], [2.0], [1.0]])
    users = torch.tensor([[1.0], [1.0]])
    exclude = Csr.from_pairs(np.array([0, 0]), np.array([1, 3]), n_rows=2)  # user 0 keeps items 0 and 2 only
    scores, rows = top_k_items(users, items, exclude, k=5)  # k larger than the catalog too
    assert rows.tolist() == [[0, 2, -1, -1, -1], [0, 1, 2, 3, -1]]
    assert scores[0, :2].tolist() == [4.0, 2.0]
    assert np.isneginf(scores[0, 2:]).all() and np.isneginf(scores[1, 4])


def test_top_k_equal_scores_order_by_item_row() -> None:
    # items 0, 2, 4 tie at the 4th place: the lowest row (0 before 2) wins it, whatever torch.topk would pick
    items = torch.tensor([[1.0], [2.0], [1.0], [2.0], [1.0], [0.5]] + [[1.0]] * 40)
    scores, rows = top_k_items(torch.tensor([[1.0]]), items, _empty_csr(1), k=4)
    assert rows.tolist() == [[1, 3, 0, 2]]
    assert scores.tolist() == [[2.0, 2.0, 1.0, 1.0]]
    _, rows = top_k_items(torch.tensor([[1.0]]), items, _empty_csr(1), k=2)  # tie inside the top-k only
    assert rows.tolist() == [[1, 3]]


def test_top_k_with_many_ties_matches_stable_brute_force() -> None:
    gen = torch.Generator().manual_seed(1)
    users = torch.randint(-2, 3, (20, 3), generator=gen).float()  # small integers: exact scores, many ties
    items = torch.randint(-2, 3, (30, 3), generator=gen).float()
    rng = np.random.default_rng(1)
    exclude = Csr.from_pairs(rng.integers(0, 20, 60), rng.integers(0, 30, 60), 20)
    dense = (users @ items.T).numpy()
    for u in range(20):
        dense[u, exclude.row(u)] = -np.inf
    for k in (1, 5, 29, 31):
        _, rows = top_k_items(users, items, exclude, k=k, chunk_size=6)
        expected = np.argsort(-dense, axis=1, kind="stable")[:, :k]  # score descending, row ascending
        expected = np.where(np.isneginf(np.take_along_axis(dense, expected, axis=1)), -1, expected)
        expected = np.pad(expected, ((0, 0), (0, k - expected.shape[1])), constant_values=-1)
        np.testing.assert_array_equal(rows, expected)


def test_top_k_rejects_mismatched_inputs() -> None:
    with pytest.raises(QuiverError, match="dim"):
        top_k_items(torch.ones((2, 3)), torch.ones((4, 5)), _empty_csr(2), k=1)
    with pytest.raises(QuiverError, match="exclusion set"):
        top_k_items(torch.ones((2, 3)), torch.ones((4, 3)), _empty_csr(3), k=1)
    with pytest.raises(QuiverError, match="exclusion item rows"):
        top_k_items(torch.ones((1, 3)), torch.ones((4, 3)), Csr.from_pairs(np.array([0]), np.array([4]), 1), k=1)
    with pytest.raises(QuiverError, match="interest_mask"):
        top_k_items(torch.ones((1, 3)), torch.ones((4, 3)), _empty_csr(1), k=1, interest_mask=torch.ones((1, 1)))


# ---- sampled protocol ---------------------------------------------------------------------------------------------


def test_sampled_metrics_ties_count_against_the_positive() -> None:
    pos = np.array([0.5, 0.9, 0.2])
    neg = np.array(
        [
            [0.5, 0.1, 0.7],  # 0.7 beats it, 0.5 ties it -> rank 3
            [0.1, 0.2, 0.3],  # rank 1
            [0.3, 0.4, 0.5],  # rank 4
        ]
    )
    got = sampled_metrics(pos, neg, k=3)
    # HR@3 = 2/3; NDCG@3 = (1/log2(4) + 1/log2(2) + 0) / 3 = (0.5 + 1) / 3 = 0.5
    assert got["HR@3"] == pytest.approx(2 / 3)
    assert got["NDCG@3"] == pytest.approx(0.5)
    assert got["users"] == 3
    got_k2 = sampled_metrics(pos, neg, k=2)  # rank 3 now misses
    assert got_k2["HR@2"] == pytest.approx(1 / 3)
    assert got_k2["NDCG@2"] == pytest.approx(1 / 3)
    assert sampled_ranks(pos, neg).tolist() == [3, 1, 4]


# ---- popularity baseline ------------------------------------------------------------------------------------------


def test_popularity_scores_counts_training_rows() -> None:
    got = popularity_scores(np.array([2, 2, 0, 0, 3, 1]), n_items=5)
    assert got.dtype == np.float32
    assert got.tolist() == [2.0, 1.0, 2.0, 1.0, 0.0]
    with pytest.raises(QuiverError, match="popularity"):
        popularity_scores(np.array([5]), n_items=5)


def test_popularity_top_k_breaks_ties_by_row_and_excludes() -> None:
    popularity = np.array([2.0, 1.0, 2.0, 1.0, 0.0], dtype=np.float32)
    # global order: 0 (2), 2 (2), 1 (1), 3 (1), 4 (0) -- equal counts in row order
    exclude = Csr.from_pairs(np.array([0, 2, 2, 3, 3, 3, 3, 3]), np.array([0, 2, 1, 0, 1, 2, 3, 4]), n_rows=4)
    rows = popularity_top_k(popularity, exclude, k=3)
    assert rows.dtype == np.int64
    assert rows.tolist() == [[2, 1, 3], [0, 2, 1], [0, 3, 4], [-1, -1, -1]]
    np.testing.assert_array_equal(popularity_top_k(popularity, exclude, k=3), rows)  # repeatable
