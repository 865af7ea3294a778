"""`quiver-train fit`: train a match model from a validated config and write its model bundle.

Runs single-process, or data-parallel under `torchrun` (DistributedDataParallel; gloo on CPU, nccl on CUDA): each
process takes every world-th example (or batch) of the epoch, gradients are averaged, rank 0 validates and writes
the bundle.

A step trains R rows of the softmax: one per event (its history -> its item) for the pooled towers, one per valid
position of each user's sequence for the sequence models (training/sequences.py). The candidates of every row
(DESIGN §3, `negatives.mode`): in_batch (the other rows' positives), sampled (N shared items), mixed (both, (R, R + N),
as TorchEasyRec lays them out) or full (the whole catalog, for small catalogs). A candidate equal to a row's own
target is masked out of that row.
"""

import copy
import hashlib
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models.attributes import filterable_columns
from models.bundle import save_bundle
from models.errors import QuiverError
from models.features import FeatureEncoder
from models.match import Layout, MatchModel
from models.registry import build_model
from models.sequence import SequenceConfig, reads_time
from models.similarity import bpr_loss, labels_for, mask_collisions, recall_at_k, softmax_loss
from training.allocator import reuse_freed_memory
from training.config import Config
from training.data.load import load_data
from training.data.readers import data_root
from training.data.schema import RawData
from training.evaluate import score_queries
from training.examples import EncodedData, encode
from training.hard_negatives import HardNegativeSampler, item_categories, read_exposures
from training.sampler import NegativeSampler, log_q_correction
from training.sequences import Sequences

FULL_SOFTMAX_MAX_ITEMS = 500_000  # (rows, items) logits per step: beyond this a step no longer fits in memory
PROGRESS_ROWS = 256  # rows of each step that the progress bar's training Recall@K ranks


@dataclass
class Rows:
    """One step's training rows: the user tower's batch and, per row, its positive and weight."""

    user_batch: dict[str, torch.Tensor]
    positives: np.ndarray  # (R,) catalog rows
    weights: np.ndarray  # (R,) float32
    users: np.ndarray  # (B,) user rows of the batch (hard negatives are drawn per user: one row per user)


@dataclass
class Scores:
    logits: torch.Tensor  # (R, C) scaled, corrected and masked
    labels: torch.Tensor  # (R,) the label column of each row
    aux_loss: torch.Tensor  # ()
    columns: np.ndarray  # catalog rows of the shared candidate columns (in-batch: positives then the pool)
    start: int  # the logits column of columns[0]


@dataclass
class FitResult:
    bundle: Path | None  # None on ranks other than 0
    metrics: dict[str, Any]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(setting: str, local_rank: int) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def data_fingerprint(raw: RawData) -> str:
    """Hash of the training events, so a bundle names the exact data that made it."""
    h = hashlib.sha256()
    for column in ("user_id", "item_id", "timestamp"):
        for chunk in raw.train[column].chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(buf)
    return h.hexdigest()[:16]


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # The manifest keeps the config with an absolute data path, so `quiver-train eval` works from any folder.
        self.config_dict = cfg.model_dump(mode="json")
        self.config_dict["data"]["path"] = str(Path(cfg.data.path).resolve())
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = pick_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
        torch.set_num_threads(cfg.train.num_threads)
        reuse_freed_memory()  # every step frees and re-allocates the same large logits (training/allocator.py)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        seed_everything(cfg.train.seed)
        self.raw = load_data(cfg.data)
        self.encoder = FeatureEncoder.fit(cfg.features, self.raw.train, self.raw.users, self.raw.items)
        sequential = isinstance(cfg.model, SequenceConfig)
        self.reads_time = reads_time(cfg.model)
        self.enc: EncodedData = encode(
            self.raw, self.encoder, cfg.data, cfg.train.valid_users, not sequential, self.reads_time
        )
        filterable_columns(self.enc.items, cfg.output.filterable, "output.filterable")  # refused before training
        self.sequences: Sequences | None = None
        if sequential:
            ev = self.enc.train
            assert ev.time is not None
            self.sequences = Sequences.build(ev.user_row, ev.item_row, ev.time, cfg.data.max_seq_len)
            if len(self.sequences) == 0:
                raise QuiverError("data: no user has two training items, so no position has a next item to predict")
        valid = self.enc.valid
        if valid is None and {"valid_metric", "patience"} & cfg.train.model_fields_set:
            key = "valid_metric" if "valid_metric" in cfg.train.model_fields_set else "patience"
            raise QuiverError(
                f"train.{key}: the data has no validation split (data.validation: none, or no user with three "
                "events), so no epoch can be picked on it; the last epoch is saved. Remove the key or add a split"
            )
        if cfg.train.valid_metric.startswith("sampled_") and (valid is None or valid.negatives is None):
            raise QuiverError(f"train.valid_metric: {cfg.train.valid_metric} needs a negatives file (data.negatives)")
        self.model: MatchModel = build_model(cfg.model, cfg.features, self.encoder.table_sizes()).to(self.device)
        if cfg.train.precision == "bf16":
            for p in self.model.row_shift_parameters():  # bfloat16 round-off would walk them (MatchModel)
                p.requires_grad_(False)
        self.ddp = DistributedDataParallel(self.model) if self.world > 1 else None
        self.optimizer = make_optimizer(cfg, self.model)
        steps = cfg.train.epochs * len(self.batches(0))
        self.scheduler = (
            torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=cfg.train.lr, total_steps=steps, pct_start=0.1)
            if cfg.train.lr_schedule == "onecycle"
            else None
        )
        neg = cfg.negatives
        if neg.mode == "full" and self.enc.n_items > FULL_SOFTMAX_MAX_ITEMS:
            raise QuiverError(
                f"negatives.mode: full scores every row against all {self.enc.n_items:,} items each step; above "
                f"{FULL_SOFTMAX_MAX_ITEMS:,} use sampled"
            )
        self.mode = neg.mode  # what each row is scored against; bench/train_speed.py switches it to compare
        self.sampler = (
            NegativeSampler(self.enc.popularity, neg.num, neg.alpha, cfg.train.seed * 1000 + self.rank, not sequential)
            if neg.mode in ("sampled", "mixed")
            else None
        )
        self.hard = self.hard_sampler()

    def hard_sampler(self) -> HardNegativeSampler | None:
        hn, enc = self.cfg.hard_negative, self.enc
        if hn.num_hard == 0:
            return None
        seen, seed = (enc.train.user_row, enc.train.item_row), self.cfg.train.seed * 1000 + self.rank + 1
        if hn.source == "category":
            category = item_categories(enc.items, hn.category_column)
            return HardNegativeSampler.by_category(category, seen, enc.n_items, hn.num_hard, seed)
        assert hn.exposures is not None
        path = Path(hn.exposures) if Path(hn.exposures).is_absolute() else data_root(self.cfg.data) / hn.exposures
        eu, ei = read_exposures(path, enc.user_ids, enc.items["item_id"].combine_chunks())
        return HardNegativeSampler.by_exposures(eu, ei, len(enc.user_ids), seen, enc.n_items, hn.num_hard, seed)

    def shard(self, epoch: int) -> np.ndarray:
        """This process's event order for the epoch; every rank gets the same count so DDP steps stay in step."""
        perm = np.random.default_rng(self.cfg.train.seed + epoch).permutation(len(self.enc.train.user_row))
        per_rank = len(perm) // self.world
        return perm[self.rank :: self.world][:per_rank]

    def batch_starts(self, n: int) -> range:
        """Batch offsets into a shard of n examples; a final batch of 1 would break in-batch negatives / BatchNorm."""
        return range(0, n - 1, self.cfg.train.batch_size)

    def batches(self, epoch: int) -> list[np.ndarray]:
        """This process's batches of the epoch: event indices, or user sequences grouped by length."""
        t = self.cfg.train
        if self.sequences is not None:
            return self.sequences.batches(t.batch_size, t.seed + epoch, self.rank, self.world)
        order = self.shard(epoch)
        return [order[s : s + t.batch_size] for s in self.batch_starts(len(order))]

    def row_count(self, idx: np.ndarray) -> int:
        """How many softmax rows a batch trains: its events, or its sequences' valid positions."""
        return int(self.sequences.positions[idx].sum()) if self.sequences is not None else len(idx)

    def rows(self, idx: np.ndarray) -> Rows:
        enc, dev = self.enc, self.device
        if self.sequences is not None:
            inputs, targets, times = self.sequences.take(idx)  # (B, T) each, right-aligned
            valid = inputs > 0  # the model's training rows: these positions, row-major
            users = self.sequences.user_row[idx]
            positives = targets[valid] - 1  # (P,)
            batch = enc.user_batch(users, inputs, dev, times if self.reads_time else None)
            return Rows(batch, positives, np.ones(len(positives), np.float32), users)
        ev = enc.train
        return Rows(
            enc.user_batch(ev.user_row[idx], ev.histories(idx), dev), ev.item_row[idx], ev.weight[idx], ev.user_row[idx]
        )

    def score(self, rows: Rows) -> Scores:
        """Each row's scaled logits over its candidates, and which column is its label."""
        dev, mode = self.device, self.mode
        r = len(rows.positives)
        layout: Layout = "in_batch" if mode in ("in_batch", "mixed") else "full" if mode == "full" else "sampled"
        shared, log_q = np.zeros(0, dtype=np.int64), None  # the candidates every row shares
        if self.sampler is not None and mode in ("sampled", "mixed"):
            shared, log_q_np = self.sampler.sample(rows.positives)  # (N,)
            log_q = torch.from_numpy(log_q_np).to(dev)
        elif mode == "full":
            shared = np.arange(self.enc.n_items)  # (I,)
        item_rows = np.concatenate([rows.positives, shared])  # (R + N,) or (R + I,)
        hard_idx = None
        if self.hard is not None:
            hard_rows, hard_pairs = self.hard.sample(rows.users, rows.positives)  # (H,), (H, 2)
            if len(hard_rows):
                item_rows = np.concatenate([item_rows, hard_rows])  # (R + N + H,)
                hard_idx = torch.from_numpy(hard_pairs).to(dev)
        distinct, slot = np.unique(item_rows, return_inverse=True)  # the item tower runs once per distinct item
        item_batch = self.enc.item_batch(distinct, dev)
        net = self.ddp or self.model
        item_index = torch.from_numpy(slot).to(dev)
        # (R, R + N [+ S]) in-batch / mixed, (R, 1 + N [+ S]) sampled, (R, I) full
        logits, aux = net(rows.user_batch, item_batch, layout=layout, hard_neg_indices=hard_idx, item_index=item_index)
        if log_q is not None and self.cfg.negatives.log_q:
            logits = log_q_correction(logits, log_q, r if layout == "in_batch" else 1)
        targets = torch.from_numpy(rows.positives).to(dev)
        if layout == "full":  # the catalog column of each row's positive; no other column holds it
            return Scores(logits, targets, aux, np.arange(self.enc.n_items), 0)
        # A candidate that is the row's own target, other than its label column: possible in-batch (duplicate
        # positives) and with a pool drawn from the whole catalog (the sequence models).
        columns, start = (np.concatenate([rows.positives, shared]), 0) if layout == "in_batch" else (shared, 1)
        if layout == "in_batch" or (self.sampler is not None and not self.sampler.exclude_positives):
            hit = torch.from_numpy(columns).to(dev)
            logits = mask_collisions(logits, targets, hit, start, label_diagonal=layout == "in_batch")
        return Scores(logits, labels_for(logits, layout == "in_batch"), aux, columns, start)

    def step(self, idx: np.ndarray) -> tuple[float, int, int]:
        rows = self.rows(idx)
        t = self.cfg.train
        weights = torch.from_numpy(rows.weights).to(self.device)
        # Under autocast the logits come out bfloat16; the losses are on autocast's float32 list, so they upcast.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
            scores = self.score(rows)
            loss = softmax_loss(scores.logits, scores.labels, weights)
            if t.bpr_weight > 0:
                loss = loss + t.bpr_weight * bpr_loss(scores.logits, scores.labels, t.bpr_negatives, weights)
        if self.sequences is not None:
            # Length-grouped batches train from 1 to 50 positions per user: a batch mean would weigh a short user's
            # position many times a long user's. Scaled by rows / the epoch's mean rows per batch, every position
            # counts the same, as in randomly mixed batches.
            loss = loss * (len(rows.positives) / self.sequences.mean_rows(self.cfg.train.batch_size))
        loss = loss + scores.aux_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        # The progress metric on at most 256 rows: a sequence batch has thousands, and ranking 1,024 rows' targets
        # among a full catalog cost a fifth of a sequence step and a tenth of a full-softmax DSSM one.
        hits, total = recall_at_k(
            scores.logits[:PROGRESS_ROWS].detach(), scores.labels[:PROGRESS_ROWS], self.cfg.train.recall_k
        )
        return float(loss.item()), hits, total

    def validate(self) -> dict[str, float]:
        if self.enc.valid is None:
            return {}
        metric, _, k = self.cfg.train.valid_metric.partition("@")
        ks = sorted({int(k), *self.cfg.eval.ks}) if not metric.startswith("sampled_") else self.cfg.eval.ks
        sampled_k = int(k) if metric.startswith("sampled_") else self.cfg.eval.sampled_k
        return score_queries(self.model, self.enc, self.enc.valid, ks, self.device, sampled_k, union=False).metrics

    def fit(self) -> FitResult:
        """Train the configured epochs; the bundle is the best epoch on the validation split, or, with no validation
        split, the last epoch trained."""
        t, started = self.cfg.train, time.monotonic()
        best_state, best_score, best_epoch, history = None, -1.0, -1, []
        validated = self.enc.valid is not None
        for epoch in range(t.epochs):
            self.model.train()
            batches = self.batches(epoch)
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not t.progress or self.rank != 0)
            loss_sum, hits, total = 0.0, 0, 0
            for i, idx in enumerate(bar):
                loss, h, n = self.step(idx)
                loss_sum, hits, total = loss_sum + loss, hits + h, total + n
                if i % 20 == 0:
                    bar.set_postfix(
                        loss=f"{loss_sum / (i + 1):.4f}", **{f"R@{t.recall_k}": f"{hits / max(total, 1):.3f}"}
                    )
            entry: dict[str, Any] = {
                "epoch": epoch + 1,
                "loss": loss_sum / max(len(batches), 1),
                f"train_Recall@{t.recall_k}": hits / max(total, 1),
                "seconds": round(time.monotonic() - started, 1),
            }
            if self.rank == 0:
                valid = self.validate()
                entry |= {f"valid_{k}": v for k, v in valid.items()}
                score = valid.get(t.valid_metric, float("nan"))
                if not validated or score > best_score:
                    best_state, best_epoch = copy.deepcopy(self.model.state_dict()), epoch + 1
                    best_score = score if validated else best_score
                shown = ["epoch", "loss", f"train_Recall@{t.recall_k}", f"valid_{t.valid_metric}", "seconds"]
                print(" ".join(f"{k}={entry[k]:.4g}" for k in shown if k in entry), flush=True)
            history.append({k: v for k, v in entry.items() if k != "seconds"})  # the manifest holds no clock time
            if self.out_of_time(started) or self.out_of_patience(epoch + 1, best_epoch):
                break
        metrics = {"best_epoch": best_epoch, "selected_by": "validation" if validated else "last_epoch"}
        if validated:
            metrics[f"valid_{t.valid_metric}"] = best_score
        result = FitResult(None, metrics | {"history": history})
        if self.rank == 0 and best_state is not None:
            self.model.load_state_dict(best_state)
            result.bundle = self.save(result.metrics)
        if self.world > 1:
            dist.barrier()
        return result

    def out_of_patience(self, epoch: int, best_epoch: int) -> bool:
        """Stop once `train.patience` epochs have passed without a better validation score (rank 0 decides)."""
        patience = self.cfg.train.patience
        stop = torch.tensor([patience is not None and self.enc.valid is not None and epoch - best_epoch >= patience])
        if self.world > 1:
            dist.broadcast(stop, src=0)
        return bool(stop.item())

    def out_of_time(self, started: float) -> bool:
        """Every rank must agree to stop, or the others would wait forever in the next all-reduce."""
        limit = self.cfg.train.max_minutes
        stop = torch.tensor([limit is not None and time.monotonic() - started > limit * 60], dtype=torch.int32)
        if self.world > 1:
            dist.broadcast(stop, src=0)
        return bool(stop.item())

    def save(self, metrics: dict[str, Any]) -> Path:
        return write_bundle(self, {"metrics": metrics})


def write_bundle(trainer: Any, extra: dict[str, Any]) -> Path:
    """Save a trainer's model (best state already loaded) as a bundle with its serving tables: users with their
    recent history, items with their training popularity. Shared by the two-tower and TDM trainers; `trainer` has
    cfg, config_dict, model, encoder, enc, raw and device."""
    enc, cfg = trainer.enc, trainer.cfg
    # The bundle's own columns win over same-named columns of the input tables.
    users = set_column(enc.users, "history", pa.array(enc.recent_items(), pa.list_(pa.string())))
    times = enc.recent_times()
    if times is not None:  # a model that reads the history's timestamps keeps them beside the history
        users = set_column(users, "history_time", pa.array(times, pa.list_(pa.int64())))
    items = set_column(enc.items, "popularity", pa.array(enc.popularity.astype(np.int64)))
    trainer.model.cpu()
    try:
        return save_bundle(
            cfg.output.root,
            cfg.output.name,
            trainer.model,
            cfg.model.model_dump(mode="json"),
            trainer.encoder,
            items,
            users,
            extra={
                "config": trainer.config_dict,
                "data_fingerprint": data_fingerprint(trainer.raw),
                "max_seq_len": cfg.data.max_seq_len,
                "filterable": filterable_columns(items, cfg.output.filterable, "output.filterable"),
                **extra,
            },
        )
    finally:
        trainer.model.to(trainer.device)


def fit(cfg: Config) -> FitResult:
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        if trainer.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
