"""DAT, MIND and hard negatives end to end on the demo catalog: train, bundle, reload, evaluate, serve inputs."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle import load_bundle
from models.errors import QuiverError
from models.inputs import user_vectors
from tests.conftest import tiny_config
from training.config import parse_config
from training.evaluate import evaluate_bundle, union_hit_rates
from training.examples import Queries
from training.ranking import Csr
from training.trainer import fit

MIND = {"type": "mind", "output_dim": 16, "temperature": 0.1, "max_k": 3, "max_seq_len": 20}
DAT = {
    "type": "dat",
    "user_tower": {"hidden_units": [64]},
    "item_tower": {"hidden_units": [64]},
    "output_dim": 16,
    "temperature": 0.1,
}


def _config(demo_dir: Path, tmp_path: Path, model: dict | None = None, **extra: object) -> dict:
    cfg = tiny_config(demo_dir, tmp_path / "models", epochs=2)
    if model is not None:
        cfg["model"] = copy.deepcopy(model)
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def mind_bundle(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("mind")
    result = fit(parse_config(_config(demo_dir, tmp, MIND), "test"))
    assert result.bundle is not None
    return result.bundle


def test_mind_bundle_round_trip_serves_the_same_interests(mind_bundle: Path) -> None:
    a, b = load_bundle(mind_bundle), load_bundle(mind_bundle)
    users = a.users.slice(0, 16)
    histories = users["history"].to_pylist()
    (va, ma), (vb, mb) = user_vectors(a, users, histories), user_vectors(b, users, histories)
    assert va.shape == (16, 3, 16) and torch.equal(ma, mb)
    assert torch.equal(va, vb)  # fixed routing logits: the same user, the same interests
    lengths = torch.tensor([len(h) for h in histories])
    expected = torch.ceil(torch.log2(lengths.clamp_min(1).float()).clamp(1, 3)).long()
    assert ma.sum(1).tolist() == expected.tolist()


def test_mind_evaluation_reports_merged_and_union_hit_rates(mind_bundle: Path, tmp_path: Path) -> None:
    report, _ = evaluate_bundle(mind_bundle, tmp_path / "report")
    m = report["model"]
    assert report["model_type"] == "mind"
    for k in (10, 20, 50):
        assert m[f"union_HR@{k}"] >= m[f"HR@{k}"]  # the union of K lists of k holds the merged top-k
    assert m["HR@50"] > report["popularity"]["HR@50"] * 0.5


def test_dat_trains_and_reloads_with_identical_vectors(demo_dir: Path, tmp_path: Path) -> None:
    result = fit(parse_config(_config(demo_dir, tmp_path, DAT), "test"))
    assert result.bundle is not None
    history = result.metrics["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    bundle = load_bundle(result.bundle)
    users = bundle.users.slice(0, 8)
    v1, _ = user_vectors(bundle, users, users["history"].to_pylist())
    v2, _ = user_vectors(load_bundle(result.bundle), users, users["history"].to_pylist())
    assert torch.equal(v1, v2)
    assert "user_aug.weight" in bundle.model.state_dict()


def test_hard_negatives_train_a_dssm(demo_dir: Path, tmp_path: Path) -> None:
    cfg = _config(demo_dir, tmp_path, hard_negative={"num_hard": 4, "source": "category"})
    result = fit(parse_config(cfg, "test"))
    assert result.bundle is not None
    assert result.metrics["history"][-1]["valid_Recall@20"] > 0.1


def test_hard_negative_category_column_must_exist(demo_dir: Path, tmp_path: Path) -> None:
    cfg = _config(demo_dir, tmp_path, hard_negative={"num_hard": 4, "source": "category", "category_column": "genre"})
    with pytest.raises(QuiverError, match="category_column"):
        fit(parse_config(cfg, "test"))


def test_config_errors_for_the_match_family(demo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(QuiverError, match=r"model\.max_seq_len"):
        parse_config(_config(demo_dir, tmp_path, {**MIND, "max_seq_len": 10}), "t.yaml")
    with pytest.raises(QuiverError, match=r"hard_negative\.exposures"):
        parse_config(_config(demo_dir, tmp_path, hard_negative={"num_hard": 2, "source": "exposures"}), "t.yaml")
    with pytest.raises(QuiverError, match=r"model\.simi_pow"):  # the discriminator tag is not in the path
        parse_config(_config(demo_dir, tmp_path, {**MIND, "simi_pow": "sharp"}), "t.yaml")
    with pytest.raises(QuiverError, match=r"model\.max_k: Input should be greater than or equal to 1"):
        parse_config(_config(demo_dir, tmp_path, {**MIND, "max_k": 0}), "t.yaml")
    with pytest.raises(QuiverError, match=r"model\.augment_dim: 8 must equal output_dim \(16\)"):
        parse_config(_config(demo_dir, tmp_path, {**DAT, "augment_dim": 8}), "t.yaml")
    with pytest.raises(QuiverError, match=r"hard_negative\.source: required"):
        parse_config(_config(demo_dir, tmp_path, hard_negative={"num_hard": 2}), "t.yaml")
    with pytest.raises(QuiverError, match=r"hard_negative\.num_hards: Extra inputs"):
        parse_config(_config(demo_dir, tmp_path, hard_negative={"num_hards": 2}), "t.yaml")


def test_union_hit_rate_by_hand() -> None:
    # 2 users, 2 interests, 4 items in 2D. user 0: interest 0 points at item 0, interest 1 at item 3 (active);
    # user 1: same vectors, but interest 1 inactive.
    items = torch.tensor([[1.0, 0.0], [0.7, 0.1], [0.1, 0.7], [0.0, 1.0]])
    users = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    truth = Csr.from_pairs(np.array([0, 1]), np.array([3, 3]), 2)
    empty = Csr.from_pairs(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 2)
    q = Queries(np.array([0, 1]), np.zeros((2, 1), dtype=np.int64), truth, empty)
    # top-1 per interest: user 0 gets {0, 3} -> hit; user 1 only {0} -> miss
    # top-2: user 0 {0, 1} + {3, 2}; user 1 {0, 1} -> still a miss
    assert union_hit_rates(users, mask, items, q, [1, 2]) == {1: 0.5, 2: 0.5}
    # top-4 covers the catalog for user 1's only interest
    assert union_hit_rates(users, mask, items, q, [4]) == {4: 1.0}
