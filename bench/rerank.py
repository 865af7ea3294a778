"""Rerank benchmark: NDCG@10 of the two-tower retrieval order vs the TDM order on the same top-200 candidates per test
user, same run. Prints one JSON line; writes report.json and recall_at_k.png beside it.

    python bench/rerank.py --config configs/tdm_beauty.yaml [--retriever BUNDLE]

Without --retriever the config's `negatives.retriever` bundle is used when it exists; otherwise the retriever config
(default configs/dssm_beauty.yaml) is trained first, in this run, under --retriever-minutes. Issue #4's goal: TDM
raises NDCG@10 by >= 10% relative over the retrieval order. Wrap it in `flock /tmp/quiver-cpu.lock` on a shared box.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.bundle import resolve_bundle
from models.errors import QuiverError
from training.config import load_config
from training.data.readers import data_root
from training.rerank import evaluate_rerank
from training.tdm_config import load_tdm_config
from training.tdm_trainer import fit_tdm
from training.trainer import fit

GOAL = {"metric": "NDCG@10", "min_relative_gain": 0.10}


def existing_bundle(path: str | None) -> Path | None:
    if path is None:
        return None
    try:
        return resolve_bundle(path)
    except QuiverError:
        return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tdm_beauty.yaml")
    p.add_argument("--retriever", default=None, help="two-tower bundle (default: the config's, else train one)")
    p.add_argument("--retriever-config", default="configs/dssm_beauty.yaml")
    p.add_argument("--retriever-minutes", type=float, default=4.0, help="training budget when the retriever is trained")
    p.add_argument("--tdm-minutes", type=float, default=None, help="override train.max_minutes of the TDM config")
    p.add_argument("--users", type=int, default=None, help="test-user sample (default: all)")
    p.add_argument("--out", default=None, help="folder (default artifacts/bench/rerank/<name>)")
    args = p.parse_args()
    started = time.monotonic()
    try:
        cfg = load_tdm_config(args.config)
        try:
            data_root(cfg.data)
        except QuiverError as err:
            print(f"rerank bench: {err} (see ../shared/data/README.md)", file=sys.stderr)
            return 2
        out = Path(args.out or f"artifacts/bench/rerank/{cfg.output.name}")
        retriever_info: dict = {"trained_here": False}
        retriever = existing_bundle(args.retriever) if args.retriever else existing_bundle(cfg.negatives.retriever)
        if args.retriever and retriever is None:
            raise QuiverError(f"--retriever {args.retriever}: not a model bundle")
        if retriever is None:
            rcfg = load_config(args.retriever_config)
            rcfg.train.max_minutes = args.retriever_minutes
            rcfg.train.progress = False
            rcfg.output.root = str(out / "models")
            t0 = time.monotonic()
            retriever = fit(rcfg).bundle
            assert retriever is not None
            retriever_info = {"trained_here": True, "config": args.retriever_config, "train_seconds": None}
            retriever_info["train_seconds"] = round(time.monotonic() - t0, 1)
        cfg.negatives.retriever = str(retriever)
        cfg.output.root = str(out / "models")
        cfg.train.progress = False
        if args.tdm_minutes is not None:
            cfg.train.max_minutes = args.tdm_minutes
        t0 = time.monotonic()
        result = fit_tdm(cfg)
        tdm_seconds = time.monotonic() - t0
        assert result.bundle is not None
        t0 = time.monotonic()
        report, report_dir = evaluate_rerank(retriever, result.bundle, out, users=args.users)
        eval_seconds = time.monotonic() - t0
    except QuiverError as err:
        print(f"rerank bench: {err}", file=sys.stderr)
        return 2
    before, after, k = report["retrieval"], report["reranked"], report["retrieve_k"]
    gain = after["NDCG@10"] / before["NDCG@10"] - 1.0 if before["NDCG@10"] else None
    history = result.metrics["history"]
    line = {
        "bench": "rerank",
        "config": args.config,
        "data": report["data"],
        "protocol": report["protocol"],
        "retriever": {"bundle": str(retriever), "type": report["retriever"]["type"], **retriever_info},
        "settings": {
            "retrieve_k": k,
            "per_positive": cfg.negatives.per_positive,
            "retrieved_ratio": cfg.negatives.retrieved_ratio,
            "windows_len": cfg.model.windows_len,
            "history": cfg.model.history,
            "epochs_run": len(history),
            "best_epoch": result.metrics["best_epoch"],
            "num_threads": cfg.train.num_threads,
        },
        "tdm_train_seconds": round(tdm_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "valid_gauc": round(max(e.get("valid_gauc", float("nan")) for e in history), 4),
        "users": report["users"],
        f"Recall@{k}": round(report[f"Recall@{k}"], 4),
        "retrieval": {m: round(before[m], 4) for m in ("HR@10", "NDCG@10")},
        "tdm": {m: round(after[m], 4) for m in ("HR@10", "NDCG@10")},
        "ratio": round(after["NDCG@10"] / before["NDCG@10"], 3) if before["NDCG@10"] else None,
        "ratio_of": "NDCG@10 TDM order / retrieval order, same candidates",
        "goal": GOAL,
        "pass": gain is not None and gain >= GOAL["min_relative_gain"],
        "seconds_total": round(time.monotonic() - started, 1),
        "report": str(report_dir / "report.json"),
    }
    (report_dir / "bench.json").write_text(json.dumps(line) + "\n")
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
