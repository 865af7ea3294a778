"""Offline evaluation: full-catalog ranking (training items excluded), the sampled protocol where a negatives file
exists, and the popularity baseline on the same queries in the same run."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.bundle import load_bundle
from models.errors import QuiverError
from models.match import MatchModel
from models.sequence import reads_time
from training.config import parse_config
from training.data.load import load_data
from training.examples import EncodedData, Queries, encode
from training.ranking import (
    first_hit_ranks,
    full_ranking_metrics,
    merged_top_k,
    popularity_top_k,
    sampled_metrics,
    sampled_ranks,
    top_k_items,
)
from training.report import write_per_user, write_report


@torch.no_grad()
def item_vectors(model: MatchModel, enc: EncodedData, device: torch.device, batch: int = 8192) -> torch.Tensor:
    """(I, D) item-tower output for the whole catalog, in batches."""
    rows = np.arange(enc.n_items)
    return torch.cat(
        [model.item_embedding(enc.item_batch(rows[s : s + batch], device)) for s in range(0, len(rows), batch)]
    )


@torch.no_grad()
def user_vectors(
    model: MatchModel, enc: EncodedData, q: Queries, device: torch.device, batch: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, K, D) serving vectors of each query and their (Q, K) active mask (K = 1 but for MIND)."""
    times = q.hist_time
    out = [
        model.interests(
            enc.user_batch(
                q.user_row[s : s + batch],
                q.hist[s : s + batch],
                device,
                times[s : s + batch] if times is not None else None,
            )
        )
        for s in range(0, len(q.user_row), batch)
    ]
    return torch.cat([v for v, _ in out]), torch.cat([m for _, m in out])


def union_hit_rates(
    users: torch.Tensor, mask: torch.Tensor, items: torch.Tensor, q: Queries, ks: list[int]
) -> dict[int, float]:
    """TorchEasyRec's multi-interest hit rate: each active interest retrieves its own top-k, and a user counts as a
    hit when the union of those lists (up to K * k items) holds a held-out item. Never below the merged HR@k.
    One top-max(ks) pass per interest serves every k (a top-k list is a prefix of the top-max(ks) list)."""
    n, k_max = len(q.user_row), max(ks)
    truth_rows = np.repeat(np.arange(n), np.diff(q.truth.indptr))  # (pairs,)
    best = np.full(len(truth_rows), np.iinfo(np.int64).max)  # best rank of each truth pair over active interests
    for j in range(users.shape[1]):
        _, top = top_k_items(users[:, j], items, q.exclude, k_max)  # (Q, k_max)
        match = top[truth_rows] == q.truth.indices[:, None]  # (pairs, k_max)
        rank = np.where(match.any(1), match.argmax(1), np.iinfo(np.int64).max)
        active = mask[:, j].cpu().numpy()[truth_rows]
        best = np.where(active, np.minimum(best, rank), best)
    out = {}
    for k in ks:
        hit = np.bincount(truth_rows[best < k], minlength=n) > 0
        out[k] = float(hit.mean()) if n else 0.0
    return out


@dataclass
class Scored:
    """An evaluation's metrics and the per-user ranks behind its hit rates, for paired model comparisons."""

    metrics: dict[str, float]
    hit_rank: np.ndarray  # (Q,) 1-based rank of the first truth item in the full ranking, max(ks) + 1 when none
    sampled_rank: np.ndarray | None  # (Q,) 1-based rank of the positive among its negatives, with a negatives file


def score_queries(
    model: MatchModel,
    enc: EncodedData,
    q: Queries,
    ks: list[int],
    device: torch.device,
    sampled_k: int = 10,
    union: bool = True,
) -> Scored:
    """union: also the multi-interest union hit rates (a top-k pass per interest; skipped in per-epoch validation)."""
    was_training = model.training
    model.eval()
    try:
        (users, mask), items = user_vectors(model, enc, q, device), item_vectors(model, enc, device)
    finally:
        model.train(was_training)
    multi = users.shape[1] > 1
    _, top = merged_top_k(users, mask, items, q.exclude, max(ks))  # (Q, max(ks)) merged over interests
    metrics = full_ranking_metrics(top, q.truth, ks)
    if multi and union:
        metrics |= {f"union_HR@{k}": v for k, v in union_hit_rates(users, mask, items, q, ks).items()}
    ranks = None
    if q.negatives is not None:
        # An item's score for a multi-interest user is its best score over the active interests.
        off = torch.where(mask, 0.0, float("-inf")).to(users.dtype)  # (Q, K)
        first_truth = q.truth.indices[q.truth.indptr[:-1]]  # (Q,) one positive per user
        pos = (torch.einsum("qkd,qd->qk", users, items[torch.from_numpy(first_truth)]) + off).amax(1)  # (Q,)
        neg = torch.einsum("qkd,qmd->qkm", users, items[torch.from_numpy(q.negatives)])  # (Q, K, M)
        neg = (neg + off.unsqueeze(-1)).amax(1)  # (Q, M)
        pos_np, neg_np = pos.cpu().numpy(), neg.cpu().numpy()
        metrics |= {f"sampled_{k}": v for k, v in sampled_metrics(pos_np, neg_np, sampled_k).items()}
        ranks = sampled_ranks(pos_np, neg_np)
    return Scored(metrics, first_hit_ranks(top, q.truth), ranks)


def popularity_metrics(enc: EncodedData, q: Queries, ks: list[int], sampled_k: int = 10) -> dict[str, float]:
    top = popularity_top_k(enc.popularity, q.exclude, max(ks))
    metrics = full_ranking_metrics(top, q.truth, ks)
    if q.negatives is not None:
        first_truth = q.truth.indices[q.truth.indptr[:-1]]
        pos, neg = enc.popularity[first_truth], enc.popularity[q.negatives]
        metrics |= {f"sampled_{k}": v for k, v in sampled_metrics(pos, neg, sampled_k).items()}
    return metrics


def recall_curve(metrics: dict[str, float], ks: list[int]) -> dict[int, float]:
    return {k: metrics[f"Recall@{k}"] for k in ks}


def evaluate_bundle(bundle_path: str | Path, out_dir: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """Re-read the bundle's data with its saved config and encodings, score the test split, write the report."""
    bundle = load_bundle(bundle_path)
    if bundle.manifest.get("model_type") == "tdm":
        raise QuiverError(
            f"{bundle.path}: a tdm ranker bundle scores given candidates; evaluate it with "
            "`quiver-train eval-rerank --retriever BUNDLE --ranker BUNDLE`"
        )
    cfg = parse_config(bundle.manifest["config"], f"{bundle.path}/manifest.json")
    torch.set_num_threads(cfg.train.num_threads)
    raw = load_data(cfg.data)
    enc = encode(raw, bundle.encoder, cfg.data, history_times=reads_time(cfg.model))
    if enc.test is None:
        raise QuiverError(f"data: {cfg.data.path} has no test split to evaluate")
    ks, device = cfg.eval.ks, torch.device("cpu")
    scored = score_queries(bundle.model, enc, enc.test, ks, device, cfg.eval.sampled_k)
    model_m = scored.metrics
    pop_m = popularity_metrics(enc, enc.test, ks, cfg.eval.sampled_k)
    report = {
        "bundle": str(bundle.path),
        "model_version": bundle.version,
        "model_type": bundle.manifest["model_type"],
        "data": {"name": raw.name, "path": cfg.data.path, "split": raw.split, "format": cfg.data.format},
        "protocol": "full-catalog ranking, the user's train+valid items excluded"
        + ("; sampled: positive vs the negatives file" if enc.test.negatives is not None else ""),
        "model": model_m,
        "popularity": pop_m,
    }
    out = Path(out_dir) if out_dir else Path("artifacts/reports") / bundle.name / bundle.version
    curves = {bundle.manifest["model_type"]: recall_curve(model_m, ks), "popularity": recall_curve(pop_m, ks)}
    write_report(out, report, curves, f"Recall@K on {raw.name} ({raw.split} test split)")
    # Per test user (users with a held-out item), for training.compare's paired differences between two models.
    has_truth = enc.test.truth.row_lengths() > 0
    per_user = {
        "user_id": np.asarray([str(x) for x in enc.user_ids.take(enc.test.user_row[has_truth]).to_pylist()]),
        "hit_rank": scored.hit_rank[has_truth],
        "truth_count": enc.test.truth.row_lengths()[has_truth],
    }
    if scored.sampled_rank is not None:
        per_user["sampled_rank"] = scored.sampled_rank[has_truth]
    write_per_user(out, per_user)
    return report, out
