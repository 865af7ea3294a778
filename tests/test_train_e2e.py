"""End to end on a small synthetic catalog: train DSSM, write the bundle, evaluate against popularity."""

import json
from pathlib import Path

import numpy as np
import torch

from models.bundle import load_bundle
from tests.conftest import tiny_config
from training.config import parse_config
from training.evaluate import evaluate_bundle, model_metrics
from training.examples import encode
from training.trainer import Trainer, fit


def test_dssm_beats_popularity_in_full_ranking(demo_dir: Path, tmp_path: Path) -> None:
    cfg_dict = tiny_config(demo_dir, tmp_path / "models", epochs=6)
    cfg = parse_config(cfg_dict, "test")
    result = fit(cfg, cfg.model_dump(mode="json"))
    assert result.bundle is not None and (result.bundle / "manifest.json").is_file()
    report, out = evaluate_bundle(result.bundle, tmp_path / "report")
    model, pop = report["model"], report["popularity"]
    assert model["users"] == pop["users"] > 700
    assert model["Recall@20"] > 1.5 * pop["Recall@20"], (model, pop)
    saved = json.loads((out / "report.json").read_text())
    assert saved["model"]["Recall@20"] == model["Recall@20"]
    assert (out / "recall_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_epoch_is_what_the_bundle_holds(demo_dir: Path, tmp_path: Path) -> None:
    cfg = parse_config(tiny_config(demo_dir, tmp_path / "models", epochs=3), "test")
    trainer = Trainer(cfg, cfg.model_dump(mode="json"))
    result = trainer.fit()
    history = result.metrics["history"]
    best = max(history, key=lambda e: e["valid_Recall@20"])
    assert result.metrics["best_epoch"] == best["epoch"]
    # The saved weights reproduce the best epoch's validation score.
    bundle = load_bundle(result.bundle)
    enc = encode(trainer.raw, bundle.encoder, cfg.data.max_seq_len, cfg.train.valid_users)
    again = model_metrics(bundle.model, enc, enc.valid, [20], torch.device("cpu"))
    assert np.isclose(again["Recall@20"], best["valid_Recall@20"])
