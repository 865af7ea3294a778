"""Paired model comparison over per-user ranks (training.compare)."""

import math
from pathlib import Path

import numpy as np
import pytest

from models.errors import QuiverError
from training.compare import load_per_user, pairable, paired_difference, per_user_values
from training.report import write_per_user


def _eval(users: list[str], hit_rank: list[int], sampled_rank: list[int] | None = None) -> dict[str, np.ndarray]:
    out = {"user_id": np.asarray(users), "hit_rank": np.asarray(hit_rank, dtype=np.int64)}
    if sampled_rank is not None:
        out["sampled_rank"] = np.asarray(sampled_rank, dtype=np.int64)
    return out


def test_per_user_values_hand_computed() -> None:
    arrays = _eval(["a", "b", "c"], [1, 11, 101], sampled_rank=[1, 3, 12])
    assert per_user_values(arrays, "HR@10").tolist() == [1.0, 0.0, 0.0]
    assert per_user_values(arrays, "HR@20").tolist() == [1.0, 1.0, 0.0]
    assert per_user_values(arrays, "sampled_HR@10").tolist() == [1.0, 1.0, 0.0]
    # NDCG of one relevant item at rank r: 1 / log2(r + 1): rank 1 -> 1, rank 3 -> 0.5, rank 12 > 10 -> 0
    assert per_user_values(arrays, "sampled_NDCG@10").tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_paired_difference_aligns_users_and_hand_computes_the_error() -> None:
    # The baseline lists the same four users in another order, plus one the model never saw.
    model = _eval(["u1", "u2", "u3", "u4"], [1, 5, 30, 2])  # HR@10 per user: 1, 1, 0, 1
    base = _eval(["u4", "u9", "u3", "u2", "u1"], [40, 1, 3, 50, 1])  # by user: u1 1, u2 0, u3 1, u4 0
    got = paired_difference(model, base, "HR@10")
    # d = (u1 0, u2 +1, u3 -1, u4 +1): mean 0.25, sample std sqrt(((-.25)^2 + .75^2 + (-1.25)^2 + .75^2) / 3)
    d = np.array([0.0, 1.0, -1.0, 1.0])
    se = d.std(ddof=1) / math.sqrt(4)
    assert got["users"] == 4
    assert got["model"] == 0.75 and got["baseline"] == 0.5
    assert got["diff"] == 0.25 and got["se"] == pytest.approx(round(se, 4))
    assert got["ci95"] == pytest.approx([round(0.25 - 1.96 * se, 4), round(0.25 + 1.96 * se, 4)])
    assert got["model_only"] == 2 and got["baseline_only"] == 1
    assert got["not_worse_at_95"] is True
    # Swapped, the same gap the other way: the interval still reaches zero (four users prove nothing).
    back = paired_difference(base, model, "HR@10")
    assert back["diff"] == -0.25 and back["not_worse_at_95"] is True


def test_a_consistent_gap_is_reported_as_worse() -> None:
    users = [f"u{i}" for i in range(400)]
    model = _eval(users, [50] * 100 + [1] * 300)  # misses the first 100 users
    base = _eval(users, [1] * 400)
    got = paired_difference(model, base, "HR@10")
    assert got["diff"] == -0.25 and got["ci95"][1] < 0 and got["not_worse_at_95"] is False


def test_full_ndcg_pairs_only_with_one_held_out_item_per_user() -> None:
    arrays = _eval(["a", "b", "c"], [1, 3, 12]) | {"truth_count": np.array([1, 1, 1])}
    assert pairable("NDCG@10", arrays)
    assert per_user_values(arrays, "NDCG@10").tolist() == pytest.approx([1.0, 0.5, 0.0])  # 1 / log2(1 + rank)
    several = arrays | {"truth_count": np.array([1, 2, 1])}  # NDCG over two truths is not a first-hit function
    assert not pairable("NDCG@10", several)
    with pytest.raises(QuiverError, match="one held-out item per user"):
        per_user_values(several, "NDCG@10")


def test_refusals_name_the_problem(tmp_path: Path) -> None:
    arrays = _eval(["a", "b"], [1, 2])
    assert not pairable("NDCG@20") and not pairable("Recall@20") and pairable("HR@20") and pairable("sampled_NDCG@10")
    with pytest.raises(QuiverError, match="Recall@20"):
        per_user_values(arrays, "Recall@20")
    with pytest.raises(QuiverError, match="sampled_rank"):
        per_user_values(arrays, "sampled_HR@10")
    with pytest.raises(QuiverError, match="share 0 users"):
        paired_difference(arrays, _eval(["x", "y"], [1, 1]), "HR@10")
    with pytest.raises(QuiverError, match="not found"):
        load_per_user(tmp_path)


def test_per_user_file_round_trips_without_pickle(tmp_path: Path) -> None:
    arrays = _eval(["user-1", "user-22"], [3, 101], sampled_rank=[1, 7])
    write_per_user(tmp_path, arrays)
    back = load_per_user(tmp_path)  # np.load(allow_pickle=False)
    assert set(back) == set(arrays)
    for name in arrays:
        assert back[name].tolist() == arrays[name].tolist()
    with pytest.raises(QuiverError, match="plain arrays"):
        write_per_user(tmp_path, {"user_id": np.asarray(["a", 1], dtype=object)})
