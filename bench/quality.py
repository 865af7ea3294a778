"""Quality benchmark: train the config's model, then score it and the popularity baseline on the same test split
in the same run. Prints one JSON line; writes report.json and recall_at_k.png beside it.

    python bench/quality.py --config configs/dssm_ml1m.yaml

The ML-1M NCF goal (issue #2): HR@10 >= 0.70 on the sampled protocol (test item vs its 99 fixed negatives) with
under 15 minutes of training on a 2-core machine. Full-ranking Recall@20 is reported beside it.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.errors import QuiverError
from training.config import load_config
from training.data.readers import data_root
from training.evaluate import evaluate_bundle
from training.trainer import fit

GOALS = {"dssm_ml1m": {"metric": "sampled_HR@10", "min": 0.70, "max_train_minutes": 15.0}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", default=None, help="report folder (default artifacts/bench/quality/<name>)")
    args = p.parse_args()
    try:
        cfg = load_config(args.config)
        root = data_root(cfg.data)
        if not root.exists():
            print(f"quality bench: data not found at {root} (see ../shared/data/README.md)", file=sys.stderr)
            return 2
        cfg.train.progress = False
        started = time.monotonic()
        result = fit(cfg)
        train_s = time.monotonic() - started
        assert result.bundle is not None
        out = Path(args.out or f"artifacts/bench/quality/{cfg.output.name}")
        report, _ = evaluate_bundle(result.bundle, out)
    except QuiverError as err:
        print(f"quality bench: {err}", file=sys.stderr)
        return 2
    model, pop = report["model"], report["popularity"]
    line: dict = {
        "bench": "quality",
        "config": args.config,
        "data": report["data"],
        "protocol": report["protocol"],
        "model_type": report["model_type"],
        "train_seconds": round(train_s, 1),
        "best_epoch": result.metrics["best_epoch"],
        "model": {k: round(v, 4) for k, v in model.items() if k != "users"},
        "popularity": {k: round(v, 4) for k, v in pop.items() if k != "users"},
        "users": model["users"],
        "report": str(out / "report.json"),
    }
    for key in ("sampled_HR@10", "sampled_NDCG@10", "Recall@20", "NDCG@20", "HR@10"):
        if key in model:
            line[key.removeprefix("sampled_") if key.startswith("sampled_") else f"full_{key}"] = round(model[key], 4)
    headline = "sampled_HR@10" if "sampled_HR@10" in model else "Recall@20"
    line["ratio"] = round(model[headline] / pop[headline], 3) if pop[headline] else None
    line["ratio_of"] = f"{headline} model / popularity"
    goal = GOALS.get(cfg.output.name)
    if goal is not None:
        line["goal"] = goal
        line["pass"] = model[goal["metric"]] >= goal["min"] and train_s <= goal["max_train_minutes"] * 60
    (out / "bench.json").write_text(json.dumps(line) + "\n")
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
