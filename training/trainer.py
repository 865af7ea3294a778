"""`quiver-train fit`: train a match model from a validated config and write its model bundle.

Runs single-process, or data-parallel under `torchrun` (DistributedDataParallel; gloo on CPU, nccl on CUDA): each
process takes every world-th example of the epoch's permutation, gradients are averaged, rank 0 validates and
writes the bundle.
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

from models.bundle import save_bundle
from models.errors import QuiverError
from models.features import FeatureEncoder
from models.match import MatchModel
from models.registry import build_model
from models.similarity import labels_for, recall_at_k, softmax_loss
from training.config import Config
from training.data.load import load_data
from training.data.readers import data_root
from training.data.schema import RawData
from training.evaluate import score_queries
from training.examples import EncodedData, encode
from training.hard_negatives import HardNegativeSampler, item_categories, read_exposures
from training.sampler import NegativeSampler, log_q_correction


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
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        seed_everything(cfg.train.seed)
        self.raw = load_data(cfg.data)
        self.encoder = FeatureEncoder.fit(cfg.features, self.raw.train, self.raw.users, self.raw.items)
        self.enc: EncodedData = encode(self.raw, self.encoder, cfg.data, cfg.train.valid_users)
        valid = self.enc.valid
        if cfg.train.valid_metric.startswith("sampled_") and (valid is None or valid.negatives is None):
            raise QuiverError(f"train.valid_metric: {cfg.train.valid_metric} needs a negatives file (data.negatives)")
        self.model: MatchModel = build_model(cfg.model, cfg.features, self.encoder.table_sizes()).to(self.device)
        self.ddp = DistributedDataParallel(self.model) if self.world > 1 else None
        self.optimizer = make_optimizer(cfg, self.model)
        steps = cfg.train.epochs * len(self.batch_starts(len(self.enc.train.user_row) // self.world))
        self.scheduler = (
            torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=cfg.train.lr, total_steps=steps, pct_start=0.1)
            if cfg.train.lr_schedule == "onecycle"
            else None
        )
        neg = cfg.negatives
        self.sampler = (
            NegativeSampler(self.enc.popularity, neg.num, neg.alpha, cfg.train.seed * 1000 + self.rank)
            if neg.mode == "sampled"
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
        """This process's example order for the epoch; every rank gets the same count so DDP steps stay in step."""
        perm = np.random.default_rng(self.cfg.train.seed + epoch).permutation(len(self.enc.train.user_row))
        per_rank = len(perm) // self.world
        return perm[self.rank :: self.world][:per_rank]

    def batch_starts(self, n: int) -> range:
        """Batch offsets into a shard of n examples; a final batch of 1 would break in-batch negatives / BatchNorm."""
        return range(0, n - 1, self.cfg.train.batch_size)

    def step(self, idx: np.ndarray) -> tuple[float, int, int]:
        ev, enc, dev = self.enc.train, self.enc, self.device
        in_batch = self.sampler is None
        item_rows = ev.item_row[idx]
        log_q = None
        if self.sampler is not None:
            neg_rows, log_q_np = self.sampler.sample(item_rows)
            item_rows = np.concatenate([item_rows, neg_rows])  # (B + N,)
            log_q = torch.from_numpy(log_q_np).to(dev)
        hard_idx = None
        if self.hard is not None:
            hard_rows, hard_pairs = self.hard.sample(ev.user_row[idx], ev.item_row[idx])  # (H,), (H, 2)
            if len(hard_rows):
                item_rows = np.concatenate([item_rows, hard_rows])  # (B + N + H,)
                hard_idx = torch.from_numpy(hard_pairs).to(dev)
        user_batch = enc.user_batch(ev.user_row[idx], ev.histories(idx), dev)
        distinct, slot = np.unique(item_rows, return_inverse=True)  # the item tower runs once per distinct item
        item_batch = enc.item_batch(distinct, dev)
        net = self.ddp or self.model
        item_index = torch.from_numpy(slot).to(dev)
        # (B, B [+ S]) in-batch or (B, 1 + N [+ S]) sampled
        logits, aux = net(user_batch, item_batch, in_batch=in_batch, hard_neg_indices=hard_idx, item_index=item_index)
        if log_q is not None and self.cfg.negatives.log_q:
            logits = log_q_correction(logits, log_q)
        labels = labels_for(logits, in_batch)
        loss = softmax_loss(logits, labels, torch.from_numpy(ev.weight[idx]).to(dev)) + aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        hits, total = recall_at_k(logits.detach(), in_batch, self.cfg.train.recall_k)
        return float(loss.item()), hits, total

    def validate(self) -> dict[str, float]:
        if self.enc.valid is None:
            return {}
        metric, _, k = self.cfg.train.valid_metric.partition("@")
        ks = sorted({int(k), *self.cfg.eval.ks}) if not metric.startswith("sampled_") else self.cfg.eval.ks
        sampled_k = int(k) if metric.startswith("sampled_") else self.cfg.eval.sampled_k
        return score_queries(self.model, self.enc, self.enc.valid, ks, self.device, sampled_k, union=False).metrics

    def fit(self) -> FitResult:
        t, started = self.cfg.train, time.monotonic()
        best_state, best_score, best_epoch, history = None, -1.0, -1, []
        for epoch in range(t.epochs):
            self.model.train()
            order = self.shard(epoch)
            starts = self.batch_starts(len(order))
            bar = tqdm(starts, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not t.progress or self.rank != 0)
            loss_sum, hits, total = 0.0, 0, 0
            for i, s in enumerate(bar):
                loss, h, n = self.step(order[s : s + t.batch_size])
                loss_sum, hits, total = loss_sum + loss, hits + h, total + n
                if i % 20 == 0:
                    bar.set_postfix(
                        loss=f"{loss_sum / (i + 1):.4f}", **{f"R@{t.recall_k}": f"{hits / max(total, 1):.3f}"}
                    )
            entry: dict[str, Any] = {
                "epoch": epoch + 1,
                "loss": loss_sum / max(len(starts), 1),
                f"train_Recall@{t.recall_k}": hits / max(total, 1),
                "seconds": round(time.monotonic() - started, 1),
            }
            if self.rank == 0:
                valid = self.validate()
                entry |= {f"valid_{k}": v for k, v in valid.items()}
                score = valid.get(t.valid_metric, -entry["loss"])  # no validation split: lowest loss wins
                if score > best_score:
                    best_state, best_score, best_epoch = copy.deepcopy(self.model.state_dict()), score, epoch + 1
                shown = ["epoch", "loss", f"train_Recall@{t.recall_k}", f"valid_{t.valid_metric}", "seconds"]
                print(" ".join(f"{k}={entry[k]:.4g}" for k in shown if k in entry), flush=True)
            history.append({k: v for k, v in entry.items() if k != "seconds"})  # the manifest holds no clock time
            if self.out_of_time(started):
                break
        result = FitResult(None, {"best_epoch": best_epoch, f"valid_{t.valid_metric}": best_score, "history": history})
        if self.rank == 0 and best_state is not None:
            self.model.load_state_dict(best_state)
            result.bundle = self.save(result.metrics)
        if self.world > 1:
            dist.barrier()
        return result

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
