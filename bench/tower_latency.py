"""User-tower latency: SASRec and HSTU reading a 50-item history, beside the mean-pooling DSSM user tower, for one
request (batch 1) and a micro-batch of 16, on this CPU. Prints one JSON line.

    python bench/tower_latency.py [--threads 1] [--repeats 500]

Each model has its config's features and sizes (configs/*_beauty.yaml) over a synthetic 12,101-item catalog (Beauty's
size) with random weights: latency does not depend on what the weights learnt. `serve` times what the service's
model thread does per batch (`Runtime.user_vectors`: history ids -> codes -> `interests`), `model` the tower's
forward pass alone. Goal: the sequence towers' p99 <= 2 ms at batch 1 (serve).
"""

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import torch
from timing import timed  # bench/timing.py, beside this script

from models.features import FeatureEncoder
from models.inputs import history_codes, to_batch
from models.match import MatchModel
from models.registry import build_model
from training.config import load_config

CONFIGS = {
    "dssm": "configs/dssm_beauty.yaml",
    "sasrec": "configs/sasrec_beauty.yaml",
    "hstu": "configs/hstu_beauty.yaml",
}
GOAL_P99_MS = 2.0


def synthetic_model(config: str, n_items: int, seed: int) -> tuple[MatchModel, FeatureEncoder, list[str]]:
    cfg = load_config(config)
    rng = np.random.default_rng(seed)
    item_ids = [f"i{i}" for i in range(n_items)]
    columns: dict[str, pa.Array] = {"item_id": pa.array(item_ids)}
    for f in cfg.features.item:
        if f.source != "item_id":
            columns[f.source] = pa.array(["|".join(map(str, rng.integers(0, 500, 4))) for _ in range(n_items)])
    train = pa.table({"user_id": ["u0"] * n_items, "item_id": item_ids})  # every item known to the vocabulary
    encoder = FeatureEncoder.fit(cfg.features, train, None, pa.table(columns))
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.features, encoder.table_sizes()).eval()
    return model, encoder, item_ids


@torch.inference_mode()
def measure(
    model: MatchModel, encoder: FeatureEncoder, histories: list[list[str]], length: int, repeats: int
) -> tuple[list[float], list[float]]:
    """(serve, model) milliseconds: history ids -> codes -> interests, and the forward pass alone."""
    cpu = torch.device("cpu")
    batch = to_batch(history_codes(encoder, histories, length), slice(None), cpu)
    serve = timed(
        lambda: model.interests(to_batch(history_codes(encoder, histories, length), slice(None), cpu)), repeats
    )
    return serve, timed(lambda: model.interests(batch), repeats)


def summary(ms: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(ms), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=500)
    p.add_argument("--items", type=int, default=12101)
    p.add_argument("--history", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    line: dict = {
        "bench": "tower_latency",
        "device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} thread(s)",
        "torch": torch.__version__,
        "history_len": args.history,
        "catalog_items": args.items,
        "repeats": args.repeats,
        "configs": CONFIGS,
    }
    rng = np.random.default_rng(1)
    for kind, config in CONFIGS.items():
        if not Path(config).is_file():
            print(f"tower_latency: {config} not found (run from the repository root)", file=sys.stderr)
            return 2
        model, encoder, ids = synthetic_model(config, args.items, seed=0)
        cfg = load_config(config)
        length = cfg.data.query_seq_len or cfg.data.max_seq_len
        entry: dict = {"model": kind, "history_positions": length}
        for b in (1, 16):
            histories = [[ids[i] for i in rng.integers(0, len(ids), args.history)] for _ in range(b)]
            serve, forward = measure(model, encoder, histories, length, args.repeats)
            entry[f"batch{b}"] = {"serve": summary(serve), "model": summary(forward)}
        line[kind] = entry
    base = line["dssm"]["batch1"]["serve"]["median_ms"]
    for kind in ("sasrec", "hstu"):
        line[kind]["ratio"] = round(line[kind]["batch1"]["serve"]["median_ms"] / base, 2)
        line[f"{kind}_p99_ms"] = line[kind]["batch1"]["serve"]["p99_ms"]
    line["ratio_of"] = "sequence tower / DSSM user tower, median serve time at batch 1"
    line["goal"] = f"sasrec and hstu p99 <= {GOAL_P99_MS} ms at batch 1"
    line["goal_met"] = all(line[f"{k}_p99_ms"] <= GOAL_P99_MS for k in ("sasrec", "hstu"))
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
