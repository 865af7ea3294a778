"""`quiver-train eval-rerank`: the two-stage offline evaluation. The two-tower retriever returns its top-K (200) per
test user (train + valid items excluded); TDM reorders exactly those candidates. HR@10 / NDCG@10 of the retrieval
order and of the TDM order are measured on the same candidates, beside Recall@K, the ceiling no reranking can pass.
"""

from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.bundle import ModelBundle, load_bundle
from models.errors import QuiverError
from models.rank import ranker_model, retriever_model
from training.data.load import load_data
from training.examples import EncodedData, Queries, encode, subsample
from training.ranking import full_ranking_metrics
from training.report import write_report
from training.tdm_config import parse_tdm_config
from training.tdm_data import retrieve, row_ids
from training.tdm_trainer import score_candidates

CURVE_KS = (1, 5, 10, 20, 50, 100, 200)


def rerank_candidates(
    ranker: ModelBundle, enc: EncodedData, q: Queries, candidates: np.ndarray, device: torch.device
) -> np.ndarray:
    """(Q, K) candidate rows reordered by TDM score, best first; -1 padding stays last. Ties keep retrieval order."""
    scores = score_candidates(ranker_model(ranker), enc, q.user_row, q.hist, candidates, device)  # (Q, K)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(candidates, order, axis=1)


def evaluate_rerank(
    retriever_path: str | Path,
    ranker_path: str | Path,
    out_dir: str | Path | None = None,
    retrieve_k: int | None = None,
    users: int | None = None,
) -> tuple[dict[str, Any], Path]:
    """Retrieve, rerank, measure; write report.json and a Recall@K plot (retrieval order vs TDM order)."""
    ranker = load_bundle(ranker_path)
    ranker_model(ranker)
    retriever = load_bundle(retriever_path)
    retriever_model(retriever)
    cfg = parse_tdm_config(ranker.manifest.get("config"), f"{ranker.path}/manifest.json")
    torch.set_num_threads(cfg.train.num_threads)
    k = retrieve_k or cfg.eval.retrieve_k
    if k < max(cfg.eval.ks):
        raise QuiverError(f"--k: {k} candidates per user, fewer than the largest eval.ks ({max(cfg.eval.ks)})")
    ks = sorted({*(kk for kk in cfg.eval.ks if kk <= k), *(kk for kk in CURVE_KS if kk <= k), k})
    raw = load_data(cfg.data)
    enc = encode(raw, ranker.encoder, cfg.data)
    if enc.test is None:
        raise QuiverError(f"data: {cfg.data.path} has no test split to evaluate")
    q = subsample(enc.test, users or cfg.eval.users)
    table = enc.users.take(q.user_row)
    candidates = retrieve(retriever, table, row_ids(enc.items, q.hist), enc.items, q.exclude, k)  # (Q, K)
    device = torch.device("cpu")
    reranked = rerank_candidates(ranker, enc, q, candidates, device)
    before = full_ranking_metrics(candidates, q.truth, ks)
    after = full_ranking_metrics(reranked, q.truth, ks)
    headline = [f"HR@{kk}" for kk in cfg.eval.ks] + [f"NDCG@{kk}" for kk in cfg.eval.ks]
    report: dict[str, Any] = {
        "retriever": {
            "bundle": str(retriever.path),
            "version": retriever.version,
            "type": retriever.manifest["model_type"],
        },
        "ranker": {"bundle": str(ranker.path), "version": ranker.version, "type": ranker.manifest["model_type"]},
        "data": {"name": raw.name, "path": cfg.data.path, "split": raw.split, "format": cfg.data.format},
        "protocol": f"retriever top-{k} over the full catalog (train + valid items excluded), reranked by TDM; "
        "metrics on the test split",
        "retrieve_k": k,
        f"Recall@{k}": before[f"Recall@{k}"],
        "retrieval": before,
        "reranked": after,
        "relative_gain": {m: (after[m] / before[m] - 1.0) if before[m] else None for m in headline},
        "users": before["users"],
    }
    out = Path(out_dir) if out_dir else Path("artifacts/reports/rerank") / ranker.name / ranker.version
    curves = {
        f"retrieval order ({retriever.manifest['model_type']})": {kk: before[f"Recall@{kk}"] for kk in ks},
        "TDM order": {kk: after[f"Recall@{kk}"] for kk in ks},
    }
    write_report(out, report, curves, f"Rerank of top-{k} on {raw.name} ({raw.split} test split)")
    return report, out
