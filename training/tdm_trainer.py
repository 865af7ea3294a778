"""`quiver-train fit` for `model.type: tdm`: train the TDM reranker on clicks vs mixed negatives, keep the best epoch
by validation (grouped) AUC, write a model bundle of type `tdm`.

Single process. Each step takes `batch_size` clicks; every click brings `per_positive` negatives with the same user
and history, so the history is embedded once per click and the attention runs for 1 + k candidates.
"""

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.attributes import filterable_columns
from models.bundle import ModelBundle, load_bundle
from models.embedding import FeatureEmbedding
from models.errors import QuiverError
from models.features import OOV, RESERVED, FeatureEncoder, Vocab
from models.rank import retriever_model
from models.tdm import TDM, click_loss, history_item_features
from training.auc import auc, grouped_auc
from training.data.load import load_data
from training.examples import EncodedData, encode, subsample
from training.ranking import full_ranking_metrics
from training.tdm_config import TDMTrainingConfig
from training.tdm_data import ClickRetrieval, Examples, NegativeMixer, training_pool, validation_examples
from training.trainer import pick_device, seed_everything, write_bundle


@dataclass
class TDMFitResult:
    bundle: Path | None
    metrics: dict[str, Any]


def tdm_user_batch(
    model: TDM, enc: EncodedData, user_row: np.ndarray, hist: np.ndarray, device: torch.device
) -> dict[str, torch.Tensor]:
    """User features + history codes (B, L), and for the "item" history the history items' item features."""
    batch = enc.user_batch(user_row, hist, device)
    if model.cfg.history == "item":
        for name, x in history_item_features(enc.item_feats, hist - 1).items():  # hist is catalog row + 1
            batch[name] = torch.from_numpy(x).to(device)
    return batch


@torch.no_grad()
def score_candidates(
    model: TDM,
    enc: EncodedData,
    user_row: np.ndarray,
    hist: np.ndarray,
    items: np.ndarray,
    device: torch.device,
    batch: int = 16384,
) -> np.ndarray:
    """(Q, M) scores of each query's candidate rows `items` (Q, M), -1 = no candidate (scored -inf).

    Queries go through in groups of about `batch` candidates; each query's history is embedded once."""
    was_training = model.training
    model.eval()
    out = np.full(items.shape, -np.inf, dtype=np.float32)
    per = max(1, batch // max(items.shape[1], 1))
    try:
        for s in range(0, len(user_row), per):
            e = min(s + per, len(user_row))
            cand = items[s:e]  # (q, M)
            valid = cand >= 0
            if not valid.any():
                continue
            q_of, col = np.nonzero(valid)  # (n,) query within the group, candidate column
            ub = tdm_user_batch(model, enc, user_row[s:e], hist[s:e], device)
            ib = enc.item_batch(cand[q_of, col], device)
            scores = model.score(ub, ib, torch.from_numpy(q_of).to(device))  # (n,)
            out[s + q_of, col] = scores.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def auc_metrics(ex: Examples, scores: np.ndarray) -> dict[str, float]:
    groups = np.repeat(ex.user_row, ex.item.shape[1])
    gauc, n = grouped_auc(groups, ex.labels().ravel(), scores.ravel())
    return {"auc": auc(ex.labels().ravel(), scores.ravel()), "gauc": gauc, "gauc_users": n}


class TDMTrainer:
    def __init__(self, cfg: TDMTrainingConfig) -> None:
        self.cfg = cfg
        self.config_dict = cfg.model_dump(mode="json")
        self.config_dict["data"]["path"] = str(Path(cfg.data.path).resolve())
        t, neg = cfg.train, cfg.negatives
        torch.set_num_threads(t.num_threads)
        self.device = pick_device("auto", 0)
        seed_everything(t.seed)
        self.raw = load_data(cfg.data)
        self.encoder = FeatureEncoder.fit(cfg.features, self.raw.train, self.raw.users, self.raw.items)
        self.enc = encode(self.raw, self.encoder, cfg.data, t.valid_users)
        filterable_columns(self.enc.items, cfg.output.filterable, "output.filterable")  # refused before training
        self.retriever_version: str | None = None
        retriever, pool = None, None
        if neg.retriever is not None:
            retriever = load_bundle(neg.retriever)
            retriever_model(retriever)
            self.retriever_version = retriever.version
            ts = self.raw.train["timestamp"].to_numpy().astype(np.int64)
            pool = training_pool(retriever, self.enc, ts, neg.retrieve_k, cfg.data.history == "others")
        self.clicks = None
        if retriever is not None and neg.retrieved_from == "click":
            self.clicks = ClickRetrieval(retriever, self.enc, neg.retrieve_k)
        self.mixer = NegativeMixer(pool, self.enc.popularity, neg.retrieved_ratio, neg.alpha, t.seed)
        valid_mixer = NegativeMixer(pool, self.enc.popularity, neg.retrieved_ratio, neg.alpha, t.seed + 7919)
        self.valid = validation_examples(self.enc, valid_mixer, neg.valid_per_positive)
        embedding = FeatureEmbedding(cfg.features, self.encoder.table_sizes())
        try:
            self.model = TDM(cfg.model, embedding).to(self.device)
        except ValueError as err:
            raise QuiverError(str(err)) from None
        self.initialised: list[str] = []
        if t.init_from_retriever:
            if retriever is None:
                raise QuiverError("train.init_from_retriever: needs negatives.retriever")
            self.initialised = copy_embeddings(retriever, self.encoder, embedding)
            if not self.initialised:
                raise QuiverError(
                    "train.init_from_retriever: no item feature has the retriever's name, kind and embedding_dim"
                )
            if t.freeze_initialised:
                for name in self.initialised:
                    embedding.tables[name].weight.requires_grad_(False)
        # Validation of the goal itself: each validation user's retrieved candidates (the pool: queried with the
        # training history, training items excluded, as at validation time) reordered by TDM, NDCG@10 of the truth.
        self.valid_pool = None
        if pool is not None and self.enc.valid is not None:
            # a seeded random subset, not the first n: validation users are in user-row order, and on Beauty the
            # first 2,000 of them score half the retrieval NDCG@10 of all 5,000 (0.027 vs 0.048)
            q = subsample(self.enc.valid, t.valid_rerank_users, t.seed)
            self.valid_pool = (q.user_row, q.hist, pool[q.user_row], q.truth)
        self.retrieval_ndcg: float | None = None
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(trainable, lr=t.lr, weight_decay=t.weight_decay)

    def step(self, idx: np.ndarray) -> tuple[float, int]:
        ev, dev, neg = self.enc.train, self.device, self.cfg.negatives
        k = neg.per_positive
        lists = None
        if self.clicks is not None:
            lists, listed = self.clicks.top(idx, ev.user_row[idx], ev.item_row[idx])  # (B, K), (B,)
            if neg.positives == "retrieved":
                idx, lists = idx[listed], lists[listed]
                if len(idx) == 0:
                    return 0.0, 0
        b = len(idx)
        positive = ev.item_row[idx]  # (B,)
        negatives = self.mixer.sample(ev.user_row[idx], positive, k, lists)  # (B, k)
        items = np.concatenate([positive, negatives.ravel()])  # (B + B k,): clicks first, then each click's k
        user_index = np.concatenate([np.arange(b), np.repeat(np.arange(b), k)])
        labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(b * k, dtype=torch.long)]).to(dev)
        user_batch = tdm_user_batch(self.model, self.enc, ev.user_row[idx], ev.histories(idx), dev)
        logits = self.model(user_batch, self.enc.item_batch(items, dev), torch.from_numpy(user_index).to(dev))
        loss = click_loss(logits, labels)  # (B (1 + k), 2) vs labels
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.item()), len(items)

    def validate(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.valid is not None:
            v = self.valid
            scores = score_candidates(self.model, self.enc, v.user_row, v.hist, v.item, self.device)
            out |= auc_metrics(v, scores)
        if self.valid_pool is not None:
            users, hist, cands, truth = self.valid_pool
            scores = score_candidates(self.model, self.enc, users, hist, cands, self.device)
            reranked = np.take_along_axis(cands, np.argsort(-scores, axis=1, kind="stable"), axis=1)
            out["rerank_NDCG@10"] = full_ranking_metrics(reranked, truth, [10])["NDCG@10"]
            if self.retrieval_ndcg is None:
                self.retrieval_ndcg = full_ranking_metrics(cands, truth, [10])["NDCG@10"]
            out["retrieval_NDCG@10"] = self.retrieval_ndcg
        return out

    def fit(self) -> TDMFitResult:
        t, started = self.cfg.train, time.monotonic()
        n = len(self.enc.train.user_row)
        best_state, best_score, best_epoch, history = None, -np.inf, -1, []
        for epoch in range(t.epochs):
            self.model.train()
            order = np.random.default_rng(t.seed + epoch).permutation(n)[: t.clicks_per_epoch]
            starts = range(0, len(order), t.batch_size)  # clicks_per_epoch: only the subset, no empty batches
            bar = tqdm(starts, desc=f"tdm epoch {epoch + 1}/{t.epochs}", disable=not t.progress)
            loss_sum, seen, steps = 0.0, 0, 0
            for i, s in enumerate(bar):
                loss, m = self.step(order[s : s + t.batch_size])
                if m:  # a step with no click left to train on (positives: retrieved) does not count
                    loss_sum, seen, steps = loss_sum + loss, seen + m, steps + 1
                if i % 20 == 0:
                    bar.set_postfix(loss=f"{loss_sum / max(steps, 1):.4f}")
            entry: dict[str, Any] = {"epoch": epoch + 1, "loss": loss_sum / max(steps, 1), "examples": seen}
            valid = self.validate()
            entry |= {f"valid_{k}": v for k, v in valid.items()}
            score = valid.get(t.valid_metric, -entry["loss"])  # no validation split: lowest loss wins
            if not np.isnan(score) and score > best_score:
                best_state, best_score, best_epoch = copy.deepcopy(self.model.state_dict()), score, epoch + 1
            shown = ("epoch", "loss", "valid_auc", "valid_gauc", "valid_rerank_NDCG@10", "valid_retrieval_NDCG@10")
            elapsed = time.monotonic() - started
            print(" ".join(f"{k}={entry[k]:.4g}" for k in shown if k in entry) + f" seconds={elapsed:.0f}", flush=True)
            history.append(entry)
            if t.max_minutes is not None and elapsed > t.max_minutes * 60:
                break
        metrics = {"best_epoch": best_epoch, f"valid_{t.valid_metric}": best_score, "history": history}
        if best_state is None:
            raise QuiverError("train: no epoch produced a finite validation score; nothing to save")
        self.model.load_state_dict(best_state)
        return TDMFitResult(self.save(metrics), metrics)

    def save(self, metrics: dict[str, Any]) -> Path:
        extra = {"retriever_version": self.retriever_version, "initialised_from_retriever": self.initialised}
        return write_bundle(self, extra | {"metrics": metrics})


@torch.no_grad()
def copy_embeddings(retriever: ModelBundle, encoder: FeatureEncoder, embedding: FeatureEmbedding) -> list[str]:
    """Start TDM's item tables from the retriever's: every item feature that both models own with the same name, kind
    and embedding_dim gets the retriever's row of each value both vocabularies hold (matched by token, so differing
    vocabularies are fine); other rows keep their random init. Returns the features copied."""
    src_model = retriever_model(retriever)
    src_feats = {f.name: f for f in retriever.encoder.groups.all() if f.shared_with is None}
    copied = []
    for f in embedding.groups.item:
        g = src_feats.get(f.name)
        if f.shared_with is not None or g is None or (g.kind, g.embedding_dim) != (f.kind, f.embedding_dim):
            continue
        src_vocab, dst_vocab = retriever.encoder.encodings.get(f.name), encoder.encodings.get(f.name)
        if not isinstance(src_vocab, Vocab) or not isinstance(dst_vocab, Vocab):
            continue
        src_index = {tok: i + RESERVED for i, tok in enumerate(src_vocab.tokens)}
        dst_rows, src_rows = [OOV], [OOV]
        for i, tok in enumerate(dst_vocab.tokens):
            j = src_index.get(tok)
            if j is not None:
                dst_rows.append(i + RESERVED)
                src_rows.append(j)
        src_table = src_model.embedding.tables[f.name].weight  # type: ignore[union-attr]
        embedding.tables[f.name].weight[torch.tensor(dst_rows)] = src_table[torch.tensor(src_rows)].to(
            embedding.tables[f.name].weight.dtype
        )
        copied.append(f.name)
    return copied


def fit_tdm(cfg: TDMTrainingConfig) -> TDMFitResult:
    return TDMTrainer(cfg).fit()
