"""End to end on a small synthetic catalog: train DSSM, write the bundle, evaluate against popularity."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle import load_bundle
from models.errors import QuiverError
from models.similarity import softmax_loss
from tests.conftest import tiny_config
from training.compare import load_per_user, paired_difference
from training.config import parse_config
from training.evaluate import evaluate_bundle, score_queries
from training.examples import encode, uniform_negatives
from training.trainer import Trainer, fit


def test_dssm_beats_popularity_in_full_ranking(demo_dir: Path, tmp_path: Path) -> None:
    cfg_dict = tiny_config(demo_dir, tmp_path / "models", epochs=6)
    cfg = parse_config(cfg_dict, "test")
    result = fit(cfg)
    assert result.bundle is not None and (result.bundle / "manifest.json").is_file()
    report, out = evaluate_bundle(result.bundle, tmp_path / "report")
    model, pop = report["model"], report["popularity"]
    assert model["users"] == pop["users"] > 700
    assert model["Recall@20"] > 1.5 * pop["Recall@20"], (model, pop)
    saved = json.loads((out / "report.json").read_text())
    assert saved["model"]["Recall@20"] == model["Recall@20"]
    assert (out / "recall_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The per-user ranks behind the report's hit rates, for paired comparisons.
    per_user = load_per_user(out)
    assert len(per_user["user_id"]) == model["users"] and len(set(per_user["user_id"].tolist())) == model["users"]
    for k in (20, 50):
        assert np.mean(per_user["hit_rank"] <= k) == pytest.approx(model[f"HR@{k}"])
    assert "sampled_rank" not in per_user  # the demo data has no negatives file
    same = paired_difference(per_user, per_user, "HR@20")
    assert same["diff"] == 0 and same["se"] == 0 and same["users"] == model["users"]


def test_best_epoch_is_what_the_bundle_holds(demo_dir: Path, tmp_path: Path) -> None:
    cfg = parse_config(tiny_config(demo_dir, tmp_path / "models", epochs=3), "test")
    trainer = Trainer(cfg)
    result = trainer.fit()
    history = result.metrics["history"]
    best = max(history, key=lambda e: e["valid_Recall@20"])
    assert result.metrics["best_epoch"] == best["epoch"]
    # The saved weights reproduce the best epoch's validation score.
    bundle = load_bundle(result.bundle)
    enc = encode(trainer.raw, bundle.encoder, cfg.data, cfg.train.valid_users)
    again = score_queries(bundle.model, enc, enc.valid, [20], torch.device("cpu")).metrics
    assert np.isclose(again["Recall@20"], best["valid_Recall@20"])


def test_onecycle_schedule_anneals_to_near_zero_by_the_last_step(demo_dir: Path, tmp_path: Path) -> None:
    cfg = parse_config(tiny_config(demo_dir, tmp_path / "models", epochs=2, lr_schedule="onecycle"), "test")
    trainer = Trainer(cfg)
    lrs = []
    for epoch in range(2):
        for idx in trainer.batches(epoch):
            lrs.append(trainer.optimizer.param_groups[0]["lr"])  # the lr this step uses
            trainer.step(idx)
    assert np.isclose(max(lrs), cfg.train.lr, rtol=1e-3)  # warms up to the configured lr
    assert lrs.index(max(lrs)) < len(lrs) // 2
    assert lrs[-1] < cfg.train.lr / 100  # and anneals away by the last step


def test_unordered_history_mode_trains_and_keeps_held_out_items_out(demo_dir: Path, tmp_path: Path) -> None:
    cfg_dict = tiny_config(demo_dir, tmp_path / "models", epochs=1)
    cfg_dict["data"] |= {"history": "others", "query_seq_len": 40}
    cfg = parse_config(cfg_dict, "test")
    trainer = Trainer(cfg)
    enc = trainer.enc
    assert enc.train.hist is None and enc.train.others is not None
    for q in (enc.valid, enc.test):
        assert q is not None and q.hist.shape[1] == 40
        for i in range(len(q.user_row)):
            held_out = set((q.truth.row(i) + 1).tolist())
            assert not held_out & set(q.hist[i].tolist())  # validation / test items never enter a history
    result = trainer.fit()
    assert result.bundle is not None
    report, _ = evaluate_bundle(result.bundle, tmp_path / "report")
    assert report["model"]["users"] > 700


def test_validation_negatives_are_distinct_and_never_known_to_the_user() -> None:
    # users 0 and 1 over a 12-item catalog: user 0 knows items 0..5, user 1 knows items 6..9
    users = np.array([0] * 6 + [1] * 4)
    items = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    negs = uniform_negatives(users, items, np.array([0, 1]), n_items=12, m=5, seed=0)
    assert negs.shape == (2, 5)
    assert set(negs[0].tolist()) <= {6, 7, 8, 9, 10, 11} and len(set(negs[0].tolist())) == 5
    assert set(negs[1].tolist()) <= {0, 1, 2, 3, 4, 5, 10, 11} and len(set(negs[1].tolist())) == 5
    with pytest.raises(QuiverError, match="fewer than 7 items"):
        uniform_negatives(users, items, np.array([0]), n_items=12, m=7, seed=0)


def test_sampled_valid_metric_without_a_negatives_file_is_a_config_error(demo_dir: Path, tmp_path: Path) -> None:
    cfg = parse_config(tiny_config(demo_dir, tmp_path / "models", valid_metric="sampled_HR@10"), "test")
    with pytest.raises(QuiverError, match=r"train\.valid_metric"):
        Trainer(cfg)


def test_bpr_term_adds_to_the_step_loss(demo_dir: Path, tmp_path: Path) -> None:
    # The same first batch, the same weights: with bpr_weight the step's loss is the softmax loss plus the weighted
    # pairwise term (positive, since every term is a softplus), and 0 leaves it the softmax alone.
    losses = []
    for weight in (0.0, 2.0):
        extra = {"bpr_weight": weight, "bpr_negatives": 8}
        cfg_dict = tiny_config(demo_dir, tmp_path / "models", epochs=1, **extra)
        cfg_dict["negatives"] = {"mode": "full"}  # no sampled pool: two score() calls see the same columns
        cfg = parse_config(cfg_dict, "test")
        trainer = Trainer(cfg)
        idx = trainer.batches(0)[0]
        rows = trainer.rows(idx)
        scores = trainer.score(rows)
        softmax = softmax_loss(scores.logits, scores.labels).item()
        torch.manual_seed(5)
        loss, _, _ = trainer.step(idx)
        losses.append((loss, softmax))
    (plain, softmax0), (mixed, softmax1) = losses
    assert softmax0 == pytest.approx(softmax1, rel=1e-5)  # same seed, same model, same batch
    assert plain == pytest.approx(softmax0, rel=1e-5)
    assert mixed > softmax1 + 0.1  # 2 x a mean of softplus terms, each > 0


def test_bf16_precision_runs_the_logits_in_bfloat16_and_keeps_the_loss_and_weights_float32(
    demo_dir: Path, tmp_path: Path
) -> None:
    cfg_dict = tiny_config(demo_dir, tmp_path / "models", epochs=1, precision="bf16")
    cfg_dict["negatives"] = {"mode": "full"}  # the same columns for every score() call
    cfg_dict["model"]["similarity"] = "inner_product"
    trainer = Trainer(parse_config(cfg_dict, "test"))
    idx = trainer.batches(0)[0]
    rows = trainer.rows(idx)
    exact = trainer.score(rows)  # outside autocast: float32 throughout
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = trainer.score(rows)
    assert exact.logits.dtype == torch.float32 and fast.logits.dtype == torch.bfloat16
    exact_loss = softmax_loss(exact.logits, exact.labels).item()
    assert not torch.equal(fast.logits.float(), exact.logits)  # bfloat16 really ran
    # bfloat16 products keep 8 bits of mantissa: the loss moves by well under a percent, not by its size.
    assert softmax_loss(fast.logits.float(), fast.labels).item() == pytest.approx(exact_loss, rel=1e-2)
    bias = trainer.model.item_mlp[-1].bias  # type: ignore[index]
    before = bias.detach().clone()
    loss, _, _ = trainer.step(idx)  # the configured step: autocast on, same weights as above
    assert loss == pytest.approx(exact_loss, rel=1e-2)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    # The item tower's output bias only shifts each row's logits: frozen under bf16, so round-off cannot walk it.
    assert trainer.model.row_shift_parameters() == [bias] and torch.equal(bias, before)
    assert sum(p.numel() for p in trainer.model.parameters() if not p.requires_grad) == bias.numel()


@pytest.mark.parametrize("mode", ["full", "sampled", "in_batch"])
def test_the_row_shift_parameters_get_no_gradient_from_the_softmax(demo_dir: Path, tmp_path: Path, mode: str) -> None:
    # What row_shift_parameters() claims, in float64 where round-off is far below the gradients: every logit of a
    # row moves together with the inner product's item bias, so the softmax's gradient on it is zero; under cosine
    # the normalisation gives the bias a real gradient and nothing is claimed.
    grads = {}
    for similarity in ("inner_product", "cosine"):
        cfg_dict = tiny_config(demo_dir, tmp_path / "models", epochs=1)
        cfg_dict["negatives"] = {"mode": mode, "num": 64} if mode == "sampled" else {"mode": mode}
        cfg_dict["model"]["similarity"] = similarity
        trainer = Trainer(parse_config(cfg_dict, "test"))
        trainer.model.double()
        rows = trainer.rows(trainer.batches(0)[0])
        rows.user_batch.update({k: v.double() for k, v in rows.user_batch.items() if v.is_floating_point()})
        bias = trainer.model.item_mlp[-1].bias  # type: ignore[index]
        scores = trainer.score(rows)
        softmax_loss(scores.logits, scores.labels).backward()
        assert bias.grad is not None
        grads[similarity] = (bias.grad.abs().max().item(), [p is bias for p in trainer.model.row_shift_parameters()])
    assert grads["inner_product"][0] < 1e-12 and grads["inner_product"][1] == [True]
    assert grads["cosine"][0] > 1e-6 and grads["cosine"][1] == []


def test_bf16_training_still_beats_popularity(demo_dir: Path, tmp_path: Path) -> None:
    cfg = parse_config(tiny_config(demo_dir, tmp_path / "models", epochs=4, precision="bf16"), "test")
    result = fit(cfg)
    assert result.bundle is not None
    report, _ = evaluate_bundle(result.bundle, tmp_path / "report")
    assert report["model"]["Recall@20"] > 1.5 * report["popularity"]["Recall@20"], report
