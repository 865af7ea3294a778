"""Training throughput. DSSM on MovieLens-1M (NCF train.tsv): Quiver's trainer against torch-rechub's DSSM; with
`--sequence`, a sequence model's positions/s beside a pooled model's events/s on the same data.

Both sides train the same towers (embedding sizes, MLP units, output dim) on the same encoded arrays, one process,
CPU, a fixed number of torch threads. The machine is shared and noisy, so the measurements alternate
(quiver, rechub, quiver, rechub, ...) and the median of the repeats is reported; each measurement first runs a few
warm-up steps, then times whole steps for `--seconds`. Throughput = positive examples trained per second.

torch-rechub is optional (it is not a Quiver dependency): without it the rechub fields are null.

    .venv/bin/python bench/train_speed.py [--config configs/dssm_ml1m.yaml] [--seconds 20] [--threads 1]
    .venv/bin/python bench/train_speed.py --sequence configs/sasrec_beauty.yaml configs/dssm_beauty.yaml
    .venv/bin/python bench/train_speed.py --precision configs/dssm_ml1m.yaml --threads 2
"""

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as `python bench/train_speed.py`: the repo's packages come first

from models.errors import QuiverError  # noqa: E402
from training.config import Config, load_config, parse_config  # noqa: E402
from training.trainer import Trainer  # noqa: E402

CPU = torch.device("cpu")
CPUINFO = Path("/proc/cpuinfo")  # Linux: the flags say whether bfloat16 products run in hardware
Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config", default="configs/dssm_ml1m_mlp.yaml", help="Quiver training config (relative to the repo)"
    )
    p.add_argument("--data", help="override data.path of the config (the ML-1M folder)")
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurements per side; the median is reported")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each measurement")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both sides")
    p.add_argument("--batch-size", type=int, help="override train.batch_size")
    p.add_argument("--no-rechub", action="store_true", help="measure Quiver only")
    p.add_argument(
        "--sequence",
        nargs=2,
        metavar=("SEQUENCE_CONFIG", "BASELINE_CONFIG"),
        help="instead: training positions/s of a sequence model beside the events/s of a pooled baseline "
        "(e.g. configs/sasrec_beauty.yaml configs/dssm_beauty.yaml)",
    )
    p.add_argument(
        "--precision",
        metavar="CONFIG",
        help="instead: one config's training rows/s with train.precision fp32 and bf16, alternating (ratio = bf16 / "
        "fp32)",
    )
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--seconds must be > 0, --repeats and --threads >= 1, --warmup >= 0")
    return args


def bench_config(args: argparse.Namespace) -> Config:
    """The config as written, with the bench's overrides applied and re-validated."""
    cfg = load_config(args.config)
    data = cfg.model_dump(mode="json", exclude_unset=True)  # unset keys stay unset (train.valid_metric)
    if args.data:
        data["data"]["path"] = args.data
    if args.batch_size:
        data["train"]["batch_size"] = args.batch_size
    data["train"] |= {"num_threads": args.threads, "device": "cpu", "progress": False}
    return parse_config(data, f"{args.config} (with bench overrides)")


class BatchStream:
    """Consecutive batches of one epoch's example order, wrapping around; both sides read the same order."""

    def __init__(self, order: np.ndarray, batch_size: int) -> None:
        self.order, self.batch_size, self.pos = order, batch_size, 0

    def next(self) -> np.ndarray:
        if self.pos + self.batch_size > len(self.order):
            self.pos = 0
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx


def timed(step: Callable[[], int | None], warmup: int, seconds: float, batch_size: int | None = None) -> float:
    """Training rows per second over whole steps, after `warmup` untimed steps: `batch_size` per step, or, for a
    step that returns it, the rows that step trained (a sequence batch trains one row per valid position)."""
    for _ in range(warmup):
        step()
    rows, steps, start = 0, 0, time.perf_counter()
    while steps == 0 or time.perf_counter() - start < seconds:
        n = step()
        rows += batch_size if batch_size is not None else int(n or 0)
        steps += 1
    return rows / (time.perf_counter() - start)


# --- torch-rechub ------------------------------------------------------------------------------------------------


class Rechub:
    """torch-rechub's DSSM mirroring the Quiver config, trained by its MatchTrainer with in-batch negatives."""

    def __init__(self, trainer: Trainer) -> None:
        import torch_rechub
        from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature
        from torch_rechub.basic.layers import EmbeddingLayer
        from torch_rechub.models.matching import DSSM
        from torch_rechub.trainers import MatchTrainer

        self.version = getattr(torch_rechub, "__version__", "unknown")
        cfg, sizes = trainer.cfg, trainer.encoder.table_sizes()

        def feature(f: Any) -> Any:
            if f.kind == "dense":
                return DenseFeature(f.name)
            if f.kind in ("multi_id", "sequence"):  # padded (n, T) codes, 0 = padding: masked mean, as Quiver
                size = sizes.get(f.shared_with or f.name, 1)
                return SequenceFeature(f.name, size, f.embedding_dim, "mean", f.shared_with, padding_idx=0)
            return SparseFeature(f.name, sizes[f.name], f.embedding_dim, padding_idx=0)

        user = [feature(f) for f in [*cfg.features.user, *cfg.features.hist]]
        item = [feature(f) for f in cfg.features.item]
        m = cfg.model
        torch.manual_seed(cfg.train.seed)
        # rechub's MLP(output_layer=False) has no separate output layer: the output dim is its last "hidden" layer.
        self.model = DSSM(
            user,
            item,
            user_params={"dims": [*m.user_tower.hidden_units, m.output_dim], "activation": m.user_tower.activation},
            item_params={"dims": [*m.item_tower.hidden_units, m.output_dim], "activation": m.item_tower.activation},
            temperature=m.temperature,
        )
        # rechub's EmbeddingLayer stacks a tower's embeddings on a new axis before flattening, so it rejects towers
        # whose features differ in size; this subclass runs rechub's own lookup per feature and concatenates.
        self.per_feature_concat = any(len({x.embed_dim for x in group}) > 1 for group in (user, item))
        if self.per_feature_concat:

            class PerFeatureEmbedding(EmbeddingLayer):
                def forward(self, x: dict, features: list, squeeze_dim: bool = False) -> torch.Tensor:
                    lookup = super().forward  # zero-argument super() does not work inside the comprehension
                    return torch.cat([lookup(x, [f], squeeze_dim=True) for f in features], dim=1)

            self.model.embedding = PerFeatureEmbedding(user + item)  # same nn.Embedding objects (cached on features)
        optimizer = torch.optim.Adagrad if cfg.train.optimizer == "adagrad" else torch.optim.Adam
        self.trainer = MatchTrainer(
            self.model,
            mode=2,  # list-wise: softmax cross-entropy over [positive, negatives]
            in_batch_neg=True,
            optimizer_fn=optimizer,
            optimizer_params={"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay},
            device="cpu",
        )
        self.enc = trainer.enc

    def batch(self, idx: np.ndarray) -> Batch:
        """The same feature arrays Quiver trains on, gathered by whole-batch numpy indexing (no per-sample Python,
        no DataLoader): cheaper than rechub's own Dataset/DataLoader path."""
        ev = self.enc.train
        x = self.enc.user_batch(ev.user_row[idx], ev.histories(idx), CPU) | self.enc.item_batch(ev.item_row[idx], CPU)
        return x, torch.ones(len(idx))  # the label is unused with in-batch negatives

    def measure_trainer(self, stream: BatchStream, warmup: int, seconds: float) -> float:
        """MatchTrainer.train_one_epoch over an iterator that stops once `seconds` have passed."""

        def warm() -> Iterator[Batch]:
            for _ in range(warmup):
                yield self.batch(stream.next())

        count = 0

        def until_deadline() -> Iterator[Batch]:
            nonlocal count
            while count == 0 or time.perf_counter() - start < seconds:
                count += 1
                yield self.batch(stream.next())

        with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar
            if warmup:
                self.trainer.train_one_epoch(warm())
            start = time.perf_counter()
            self.trainer.train_one_epoch(until_deadline())
            elapsed = time.perf_counter() - start
        return count * stream.batch_size / elapsed

    def measure_vectorised(self, stream: BatchStream, warmup: int, seconds: float) -> float:
        """MatchTrainer's in-batch step with its per-row sampling loop replaced by a fixed index of all other rows
        (same loss: cross-entropy is indifferent to the order of the negatives)."""
        from torch_rechub.utils.match import gather_inbatch_logits

        b, mt = stream.batch_size, self.trainer
        j = torch.arange(b - 1).unsqueeze(0)
        neg = j + (j >= torch.arange(b).unsqueeze(1)).long()  # (B, B - 1): every column except the row's own
        target = torch.zeros(b, dtype=torch.long)
        mt.model.train()

        def step() -> None:
            x, _ = self.batch(stream.next())
            u, v = mt.model.user_tower(x), mt.model.item_tower(x)  # (B, D) each
            logits = gather_inbatch_logits(u @ v.T, neg)  # (B, B)
            loss = mt.criterion(logits, target) + mt.reg_loss_fn(mt.model)
            mt.model.zero_grad()
            loss.backward()
            mt.optimizer.step()
            loss.item()

        return timed(step, warmup, seconds, b)


def load_rechub(trainer: Trainer) -> tuple[Rechub | None, str]:
    try:
        return Rechub(trainer), ""
    except ImportError as err:
        return None, f"torch_rechub not importable ({err}): rechub not measured"


# --- report ------------------------------------------------------------------------------------------------------


def settings(cfg: Config, args: argparse.Namespace, rechub: Rechub | None) -> dict[str, Any]:
    def dims(group: list) -> dict[str, str]:
        return {f.name: f.kind if f.kind == "dense" else f"{f.kind}:{f.embedding_dim}" for f in group}

    m, neg, b = cfg.model, cfg.negatives, cfg.train.batch_size
    quiver_neg = f"sampled {neg.num} shared per batch, alpha {neg.alpha}, log_q {neg.log_q}"
    return {
        "config": os.path.relpath(args.config, REPO),
        "batch_size": b,
        "user_features": dims([*cfg.features.user, *cfg.features.hist]),
        "item_features": dims(cfg.features.item),
        "user_tower_units": m.user_tower.hidden_units,
        "item_tower_units": m.item_tower.hidden_units,
        "output_dim": m.output_dim,
        "similarity": m.similarity,
        "negatives": {
            "quiver": quiver_neg if neg.mode == "sampled" else f"in-batch {b - 1}",
            "rechub": f"in-batch {b - 1}" if rechub else None,
        },
        "optimizer": f"{cfg.train.optimizer} lr {cfg.train.lr}",
        "threads": args.threads,
        "device": "cpu",
        "seconds_per_measurement": args.seconds,
        "repeats": args.repeats,
        "warmup_steps": args.warmup,
        "torch": torch.__version__,
        "torch_rechub": rechub.version if rechub else None,
    }


def note(cfg: Config, rechub: Rechub | None, missing: str) -> str:
    if rechub is None:
        return missing
    b, n = cfg.train.batch_size, cfg.negatives.num
    ours = (
        f"softmax over 1 positive + a shared pool of {n} sampled items (which Quiver's item tower also encodes "
        "each step)"
        if cfg.negatives.mode == "sampled"
        else "in-batch softmax"
    )
    parts = [
        "rechub: torch_rechub.models.matching.DSSM + MatchTrainer(mode=2 list-wise, in_batch_neg=True): softmax "
        f"cross-entropy over 1 positive + {b - 1} in-batch negatives, the closest it has to Quiver's {ours}",
        "multi_id features (genres) are rechub SequenceFeatures with mean pooling over non-padding codes",
        "rechub's MLP always adds BatchNorm + Dropout(0) after every layer including the output one, and its "
        "in-batch path ignores the temperature",
        "batches for rechub are built by the same whole-batch numpy gathers Quiver uses (no DataLoader)",
        "rechub_samples_per_s is its MatchTrainer.train_one_epoch, whose in-batch sampler loops over the rows in "
        "Python (a randperm per row); rechub_vectorised_samples_per_s is the same step with that loop replaced by "
        "a fixed all-other-rows index",
    ]
    if rechub.per_feature_concat:
        parts.append(
            "rechub's EmbeddingLayer cannot mix embedding sizes within a tower, so its lookup runs per feature and "
            "the results are concatenated (a 3-line subclass; same tables, same math)"
        )
    return "; ".join(p for p in parts if p)


def median_or_none(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


class Cycle:
    """A trainer's own epoch batches, wrapping around to the next epoch's."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.epoch, self.batches = trainer, 0, trainer.batches(0)

    def step(self) -> int:
        if not self.batches:
            self.epoch += 1
            self.batches = self.trainer.batches(self.epoch)
        idx = self.batches.pop()
        self.trainer.step(idx)
        return self.trainer.row_count(idx)


def repo_path(path: str) -> str:
    """A config path as typed when it exists, else relative to the repo."""
    return str(Path(path).resolve()) if Path(path).exists() else str(REPO / path)


def data_trainer(cfg: Config) -> Trainer:
    """The config's Trainer; a missing data folder is a QuiverError naming it, not a traceback from a reader."""
    if not Path(cfg.data.path).exists():
        raise QuiverError(f"data {cfg.data.path} not found (see ../shared/data/README.md)")
    return Trainer(cfg)


def alternate(trainers: dict[str, Trainer], args: argparse.Namespace) -> dict[str, list[float]]:
    """Rows/s of each trainer's own batches, taking turns `--repeats` times, so the noise of a shared machine falls
    on every side alike."""
    runs: dict[str, list[float]] = {name: [] for name in trainers}
    cycles = {name: Cycle(t) for name, t in trainers.items()}
    for _ in range(args.repeats):
        for name, trainer in trainers.items():
            trainer.model.train()
            runs[name].append(timed(cycles[name].step, args.warmup, args.seconds))
    return runs


def sequence_speed(args: argparse.Namespace) -> int:
    """Positions/s of a sequence model's training (every valid position is a softmax row) beside events/s of a
    pooled baseline on the same data, alternating, the median of the repeats."""
    trainers: dict[str, Trainer] = {}
    try:
        for name, path in zip(("sequence", "baseline"), args.sequence, strict=True):
            args.config = repo_path(path)
            trainers[name] = data_trainer(bench_config(args))
    except QuiverError as err:
        print(f"train_speed: {err}", file=sys.stderr)
        return 2
    runs = alternate(trainers, args)
    seq, base = (median_or_none(runs[k]) for k in ("sequence", "baseline"))
    seq_cfg, base_cfg = trainers["sequence"].cfg, trainers["baseline"].cfg
    print(
        json.dumps(
            {
                "bench": "train_speed",
                "data": f"{trainers['sequence'].raw.name} training split ({trainers['sequence'].raw.split})",
                "settings": {
                    "sequence_config": os.path.relpath(args.sequence[0], REPO),
                    "baseline_config": os.path.relpath(args.sequence[1], REPO),
                    "sequence_model": seq_cfg.model.type,
                    "sequence_negatives": seq_cfg.negatives.model_dump(),
                    "sequence_batch_users": seq_cfg.train.batch_size,
                    "baseline_negatives": base_cfg.negatives.model_dump(),
                    "baseline_batch_events": base_cfg.train.batch_size,
                    "threads": args.threads,
                    "seconds_per_measurement": args.seconds,
                    "repeats": args.repeats,
                },
                f"{seq_cfg.model.type}_positions_per_s": seq,
                f"{base_cfg.model.type}_events_per_s": base,
                "ratio": round(seq / base, 2) if seq and base else None,
                "ratio_of": "sequence positions/s / baseline events/s: softmax rows trained per second on each side",
                "runs": {k: [round(v, 1) for v in vs] for k, vs in runs.items()},
            }
        )
    )
    return 0


def precision_speed(args: argparse.Namespace) -> int:
    """Rows/s of one config trained in float32 and under bfloat16 autocast, alternating, the median of the repeats:
    what train.precision buys on this CPU (the matrix products speed up only with AVX512-BF16 / AMX)."""
    args.config = repo_path(args.precision)
    trainers: dict[str, Trainer] = {}
    try:
        data = bench_config(args).model_dump(mode="json", exclude_unset=True)
        for precision in ("fp32", "bf16"):
            data["train"]["precision"] = precision
            trainers[precision] = data_trainer(parse_config(data, f"{args.config} (with bench overrides)"))
    except QuiverError as err:
        print(f"train_speed: {err}", file=sys.stderr)
        return 2
    runs = alternate(trainers, args)
    fp32, bf16 = median_or_none(runs["fp32"]), median_or_none(runs["bf16"])
    cfg = trainers["fp32"].cfg
    print(
        json.dumps(
            {
                "bench": "train_speed",
                "data": f"{trainers['fp32'].raw.name} training split ({trainers['fp32'].raw.split})",
                "settings": {
                    "config": os.path.relpath(args.config, REPO),
                    "model": cfg.model.type,
                    "negatives": cfg.negatives.model_dump(),
                    "batch_size": cfg.train.batch_size,
                    "threads": args.threads,
                    "seconds_per_measurement": args.seconds,
                    "repeats": args.repeats,
                    "cpu_bf16": CPUINFO.exists() and "avx512_bf16" in CPUINFO.read_text(),
                },
                "fp32_rows_per_s": fp32,
                "bf16_rows_per_s": bf16,
                "ratio": round(bf16 / fp32, 2) if fp32 and bf16 else None,
                "ratio_of": "bf16 rows/s / fp32 rows/s: the same config, batches and threads",
                "runs": {k: [round(v, 1) for v in vs] for k, vs in runs.items()},
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sequence or args.precision:
        torch.set_num_threads(args.threads)
        os.chdir(REPO)
        return sequence_speed(args) if args.sequence else precision_speed(args)
    torch.set_num_threads(args.threads)
    # Paths on the command line are relative to where it was typed; the config's own paths (data.path
    # ../shared/data/ml-1m) to the repo root, as for quiver-train.
    args.config = repo_path(args.config)
    args.data = str(Path(args.data).resolve()) if args.data else None
    os.chdir(REPO)
    try:
        cfg = bench_config(args)
        data_dir = Path(cfg.data.path)
        if not data_dir.is_dir():
            raise QuiverError(
                f"data folder {data_dir.resolve()} (data.path {cfg.data.path}) not found: the ML-1M NCF split "
                "(train.tsv, test.tsv, users.dat, movies.dat) is needed; pass --data or fix data.path"
            )
        trainer = Trainer(cfg)
    except QuiverError as err:
        print(f"train_speed: {err}", file=sys.stderr)
        return 2
    trainer.model.train()
    b = cfg.train.batch_size
    order = trainer.shard(0)
    rechub, missing = (None, "rechub skipped (--no-rechub)") if args.no_rechub else load_rechub(trainer)

    runs: dict[str, list[float]] = {"quiver": [], "quiver_in_batch": [], "rechub": [], "rechub_vectorised": []}
    streams = {name: BatchStream(order, b) for name in runs}
    mode = trainer.mode

    def quiver_step() -> None:
        trainer.step(streams["quiver"].next())

    def quiver_in_batch_step() -> None:
        # The loss rechub trains: softmax over 1 positive + the other B - 1 rows' positives. Same towers, same
        # batches.
        trainer.mode = "in_batch"
        try:
            trainer.step(streams["quiver_in_batch"].next())
        finally:
            trainer.mode = mode

    for _ in range(args.repeats):
        runs["quiver"].append(timed(quiver_step, args.warmup, args.seconds, b))
        runs["quiver_in_batch"].append(timed(quiver_in_batch_step, args.warmup, args.seconds, b))
        if rechub is not None:
            runs["rechub"].append(rechub.measure_trainer(streams["rechub"], args.warmup, args.seconds))
            runs["rechub_vectorised"].append(
                rechub.measure_vectorised(streams["rechub_vectorised"], args.warmup, args.seconds)
            )

    q, qi, r, rv = (median_or_none(runs[k]) for k in ("quiver", "quiver_in_batch", "rechub", "rechub_vectorised"))
    print(
        json.dumps(
            {
                "bench": "train_speed",
                "data": "ml-1m NCF train.tsv",
                "settings": settings(cfg, args, rechub),
                "quiver_samples_per_s": q,
                "quiver_in_batch_samples_per_s": qi,
                "rechub_samples_per_s": r,
                "ratio": round(qi / r, 2) if qi and r else None,
                "ratio_of": "quiver_in_batch / rechub: the same in-batch softmax, towers and batches on both sides",
                "ratio_config_negatives": round(q / r, 2) if q and r else None,
                "goal": "ratio >= 2.0",
                "rechub_vectorised_samples_per_s": rv,
                "ratio_vs_vectorised": round(qi / rv, 2) if qi and rv else None,
                "runs": {k: [round(v, 1) for v in vs] for k, vs in runs.items()},
                "note": note(cfg, rechub, missing),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
