"""Paired comparison of two models evaluated on the same test users.

Two well-trained models' hit rates on one split often differ by about the standard error of either (HR@10 on
ML-1M's 6,040 test users: about 0.006), so "A is level with B" needs the per-user differences: most users hit or
miss under both models alike, and the paired error, from the users they disagree on, is the one that measures the
gap.
"""

import math
import re
from pathlib import Path

import numpy as np

from models.errors import QuiverError
from training.report import PER_USER_NAME

_METRIC = re.compile(r"^(sampled_)?(HR|NDCG)@(\d+)$")


def pairable(metric: str, arrays: dict[str, np.ndarray] | None = None) -> bool:
    """Whether per_user_values can split `metric` into per-user values: HR@K and the sampled metrics always;
    full-ranking NDCG@K where every user has one held-out item (leave-one-out), recorded as `truth_count`."""
    match = _METRIC.match(metric)
    if match is None:
        return False
    if match.group(2) == "NDCG" and not match.group(1):
        return arrays is not None and "truth_count" in arrays and bool(np.all(arrays["truth_count"] == 1))
    return True


def per_user_values(arrays: dict[str, np.ndarray], metric: str) -> np.ndarray:
    """(U,) float64 each user's contribution to `metric` (its mean over users is the metric).

    HR@K and sampled_HR@K / sampled_NDCG@K, the metrics with one relevant item per user or a first-hit definition;
    full-ranking NDCG is a function of the first hit only when each user has one truth item (1 / log2(1 + rank)),
    and is refused otherwise."""
    match = _METRIC.match(metric)
    if match is None or not pairable(metric, arrays):
        raise QuiverError(
            f"compare: no per-user values for {metric!r}; use HR@K, sampled_HR@K, sampled_NDCG@K, or NDCG@K on a "
            "split with one held-out item per user"
        )
    key = "sampled_rank" if match.group(1) else "hit_rank"
    if key not in arrays:
        raise QuiverError(f"compare: {metric} needs {key!r}, which this evaluation did not record")
    rank, k = arrays[key].astype(np.int64), int(match.group(3))
    if match.group(2) == "HR":
        return (rank <= k).astype(np.float64)
    return np.where(rank <= k, 1.0 / np.log2(rank + 1.0), 0.0)


def paired_difference(model: dict[str, np.ndarray], baseline: dict[str, np.ndarray], metric: str) -> dict:
    """model − baseline on `metric` over the users both evaluated, with the paired standard error and a normal 95%
    interval. `not_worse_at_95` says the interval reaches zero or above: no evidence the model is worse."""
    common, mi, bi = np.intersect1d(model["user_id"], baseline["user_id"], return_indices=True)
    if common.size < 2:
        raise QuiverError(f"compare: the two evaluations share {common.size} users; nothing to pair")
    a, b = per_user_values(model, metric)[mi], per_user_values(baseline, metric)[bi]
    d = a - b  # (U,)
    diff, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))
    lo, hi = diff - 1.96 * se, diff + 1.96 * se
    return {
        "metric": metric,
        "users": int(d.size),
        "model": round(float(a.mean()), 4),
        "baseline": round(float(b.mean()), 4),
        "diff": round(diff, 4),
        "se": round(se, 4),
        "ci95": [round(lo, 4), round(hi, 4)],
        "model_only": int((d > 0).sum()),  # users the model serves better
        "baseline_only": int((d < 0).sum()),
        "not_worse_at_95": bool(hi >= 0),
    }


def load_per_user(report_dir: Path) -> dict[str, np.ndarray]:
    path = Path(report_dir) / PER_USER_NAME
    if not path.is_file():
        raise QuiverError(f"compare: {path} not found; evaluate the bundle first (`quiver-train eval`)")
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
