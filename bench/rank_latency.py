"""Rank latency benchmark: one user (history 50) with 200 and 1,000 candidates, scored by TDM on this CPU, beside a
plain MLP over the same features (mean-pooled history + candidate + user -> the same final MLP), the cost of the
multi-window attention. Prints one JSON line.

    python bench/rank_latency.py [--config configs/tdm_beauty.yaml] [--threads 1] [--repeats 400] [--rounds 8]

The model has the config's features and sizes over a synthetic 12,101-item catalog (Beauty's size), random weights:
latency does not depend on what the weights learnt. `serve` times the whole serving call (`Ranker.score`: id lookups,
catalog vectors, `TDM.one_user_logits`); `serve_reference` the same call through `Ranker(fused=False)` (feature
encoding and the batched forward pass per request, the implementation before the fused path); `model` and
`model_reference` the forward pass alone on encoded features (fused, and fused=False), which the MLP is compared to.
Every variant runs `repeats / rounds` calls per round, the variants interleaved round by round, so a noisy neighbour
slows all of them alike; `speedup` = reference / fused median (p99 likewise) of the serving call.
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import torch
from timing import timed  # bench/timing.py, beside this script
from torch import nn

from models.bundle import load_bundle, save_bundle
from models.embedding import FeatureEmbedding
from models.features import FeatureEncoder
from models.mlp import MLP
from models.rank import Ranker
from models.tdm import TDM
from training.tdm_config import load_tdm_config


class PooledMLP(nn.Module):
    """The baseline: TDM's inputs without the attention. x = [mean_t s_t, q, user] -> the same `final` MLP."""

    def __init__(self, tdm: TDM) -> None:
        super().__init__()
        self.tdm = tdm
        self.final = MLP(2 * tdm.hist_dim + tdm.user_dim, tdm.cfg.final, 2)

    def forward(self, user_batch: dict[str, torch.Tensor], item_batch: dict[str, torch.Tensor]) -> torch.Tensor:
        s, mask = self.tdm.history(user_batch)  # (1, T, C)
        m = mask.unsqueeze(-1).to(s.dtype)
        pooled = (s * m).sum(1) / m.sum(1).clamp_min(1.0)  # (1, C)
        q = self.tdm.query(item_batch)  # (N, C)
        parts = [pooled.expand(q.shape[0], -1), q]
        if self.tdm.user_dim:
            parts.append(self.tdm.embedding("user", user_batch).expand(q.shape[0], -1))
        return self.final(torch.cat(parts, dim=-1))


def synthetic_bundle(config: str, root: Path, n_items: int, seed: int) -> Path:
    cfg = load_tdm_config(config)
    rng = np.random.default_rng(seed)
    item_ids = [f"i{i}" for i in range(n_items)]
    columns: dict[str, pa.Array] = {"item_id": pa.array(item_ids)}
    for f in cfg.features.item:
        if f.source == "item_id":
            continue
        if f.kind == "dense":
            columns[f.source] = pa.array(rng.normal(size=n_items))
        elif f.kind == "multi_id":
            columns[f.source] = pa.array(["|".join(map(str, rng.integers(0, 500, 4))) for _ in range(n_items)])
        else:
            columns[f.source] = pa.array([str(x) for x in rng.integers(0, 100, n_items)])
    items = pa.table(columns)
    users = pa.table({"user_id": ["u0"]} | {f.source: ["1"] for f in cfg.features.user if f.source != "user_id"})
    train = pa.table({"user_id": ["u0"] * n_items, "item_id": item_ids})  # every item known to the vocabulary
    encoder = FeatureEncoder.fit(cfg.features, train, users, items)
    torch.manual_seed(seed)
    model = TDM(cfg.model, FeatureEmbedding(cfg.features, encoder.table_sizes()))
    history = pa.array([[item_ids[i] for i in rng.integers(0, n_items, 50)]], pa.list_(pa.string()))
    users = users.append_column("history", history)
    return save_bundle(root, "latency", model, cfg.model.model_dump(mode="json"), encoder, items, users)


def summary(ms: list[float], n: int) -> dict[str, float]:
    median = statistics.median(ms)
    return {
        "median_ms": round(median, 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "candidates_per_s": round(n / (median / 1000.0)),
    }


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, rounds: int) -> dict[str, list[float]]:
    """ms samples of each call, `repeats` in all, taken in `rounds` interleaved rounds."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name] += timed(fn, max(1, repeats // rounds))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tdm_beauty.yaml")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=400)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--items", type=int, default=12101)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(synthetic_bundle(args.config, Path(tmp), args.items, seed=0))
    ranker, reference = Ranker(bundle), Ranker(bundle, fused=False)
    tdm = ranker.model
    mlp = PooledMLP(tdm).eval()
    ids = [str(x) for x in bundle.items["item_id"].to_pylist()]
    history = bundle.users["history"][0].as_py()
    rng = np.random.default_rng(1)
    line: dict = {
        "bench": "rank_latency",
        "config": args.config,
        "device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} thread(s)",
        "torch": torch.__version__,
        "history_len": len(history),
        "windows_len": tdm.cfg.windows_len,
        "history": tdm.cfg.history,
        "width_C": tdm.hist_dim,
        "catalog_items": len(ids),
        "repeats": args.repeats,
        "rounds": args.rounds,
    }
    for n in (200, 1000):
        cands = [ids[i] for i in rng.choice(len(ids), n, replace=False)]
        # The forward pass alone, on the tensors the reference serving call builds.
        profile, _ = reference.profile("u0")
        ub = reference.user_batch(profile, history)
        ib = reference.item_batch([reference.item_row[c] for c in cands])
        with torch.inference_mode():
            ms = interleaved(
                {
                    "serve": lambda c=cands: ranker.score("u0", history, c),
                    "serve_reference": lambda c=cands: reference.score("u0", history, c),
                    "model": lambda ub=ub, ib=ib: tdm.score(ub, ib),
                    "model_reference": lambda ub=ub, ib=ib: tdm.score(ub, ib, fused=False),
                    "mlp": lambda ub=ub, ib=ib: mlp(ub, ib),
                },
                args.repeats,
                args.rounds,
            )
        row = {name: summary(v, n) for name, v in ms.items()}
        row["ratio"] = round(statistics.median(ms["model"]) / statistics.median(ms["mlp"]), 2)
        row["ratio_reference"] = round(statistics.median(ms["model_reference"]) / statistics.median(ms["mlp"]), 2)
        for key, stat in (("median_ms", "speedup"), ("p99_ms", "speedup_p99")):
            row[stat] = round(row["serve_reference"][key] / row["serve"][key], 2)
        line[f"n{n}"] = row
    line["ratio"] = line["n1000"]["ratio"]
    line["ratio_of"] = "TDM forward time / plain-MLP forward time at 1,000 candidates (cost of the attention)"
    line["goal_serve_p99_ms_n200"] = {"target": 5.0, "met": line["n200"]["serve"]["p99_ms"] <= 5.0}
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
