"""The numpy copy of DSSM's user tower (models/numpy_tower.py) equals the torch forward, and the runtime uses it only
for few-row batches."""

import numpy as np
import pytest
import torch

from models.dssm import DSSMConfig
from models.features import FeatureGroups
from models.mind import MINDConfig
from models.numpy_tower import SINGLE_THREAD_GEMM, NumpyTower
from models.registry import build_model
from service.runtime import find_target, load_runtime
from service.userstate import resolve
from tests.serving import Tree, settings

FEATURES = {
    "user": [
        {"name": "user_id", "kind": "id", "embedding_dim": 5},
        {"name": "tags", "kind": "multi_id", "embedding_dim": 3},
        {"name": "age", "kind": "dense"},
    ],
    "item": [{"name": "item_id", "kind": "id", "embedding_dim": 6}],
    "hist": [{"name": "hist_item_id", "kind": "sequence", "shared_with": "item_id", "embedding_dim": 6}],
}
SIZES = {"user_id": 20, "tags": 7, "item_id": 50}


def _model(tower: dict, similarity: str = "cosine", **extra: object) -> torch.nn.Module:
    cfg = {"type": "dssm", "user_tower": tower, "output_dim": 4, "similarity": similarity, **extra}
    torch.manual_seed(0)
    model = build_model(DSSMConfig.model_validate(cfg), FeatureGroups.model_validate(FEATURES), SIZES)
    with torch.no_grad():  # trained-looking statistics, so that folding the batch norm is really exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, torch.nn.PReLU):
                m.weight.fill_(0.3)
    return model.eval()


def _feats(b: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hist = rng.integers(0, SIZES["item_id"], (b, 6))
    hist[0] = 0  # an empty history: zeros, not a division by zero
    hist[-1, 3:] = 0  # left-aligned with padding, as history_codes lays it out
    tags = rng.integers(0, SIZES["tags"], (b, 3))
    return {
        "user_id": rng.integers(0, SIZES["user_id"], b),
        "tags": tags,
        "age": rng.standard_normal(b).astype(np.float32),
        "hist_item_id": hist,
    }


def _torch(model: torch.nn.Module, feats: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        vectors, mask = model.interests({k: torch.from_numpy(v) for k, v in feats.items()})
    assert mask.all()
    return vectors.numpy()


@pytest.mark.parametrize(
    ("tower", "similarity"),
    [
        ({"hidden_units": [8]}, "cosine"),
        ({"hidden_units": [8, 6], "activation": "tanh"}, "inner_product"),
        ({"hidden_units": [8], "activation": "prelu", "batch_norm": True, "dropout": 0.3}, "cosine"),
    ],
)
def test_numpy_tower_equals_the_torch_forward(tower: dict, similarity: str) -> None:
    model = _model(tower, similarity)
    small = NumpyTower.compile(model)
    assert small is not None
    for b in (1, 2, 5):
        feats = _feats(b, seed=b)
        vectors, mask = small(feats)
        want = _torch(model, feats)
        assert vectors.shape == want.shape == (b, 1, 4) and vectors.dtype == np.float32
        assert mask.shape == (b, 1) and mask.all()
        np.testing.assert_allclose(vectors, want, rtol=1e-5, atol=1e-6)
    if similarity == "cosine":
        np.testing.assert_allclose(np.linalg.norm(vectors[:, 0], axis=1), 1.0, rtol=1e-5)


def test_what_it_cannot_reproduce_stays_with_torch() -> None:
    assert NumpyTower.compile(_model({"hidden_units": [8], "activation": "gelu"})) is None  # numpy has no erf
    assert NumpyTower.compile(_model({"hidden_units": [8]}, variational_dropout=["user"])) is None
    assert NumpyTower.compile(_model({"hidden_units": [8]}).train()) is None  # dropout and batch norm differ
    mind = build_model(
        MINDConfig.model_validate({"type": "mind", "max_k": 2}),
        FeatureGroups.model_validate(FEATURES),
        SIZES,
    )
    assert NumpyTower.compile(mind.eval()) is None


def test_batches_stay_under_the_size_at_which_blas_starts_threads() -> None:
    narrow = NumpyTower.compile(_model({"hidden_units": [8]}))
    wide = NumpyTower.compile(_model({"hidden_units": [4096]}))
    assert narrow is not None and wide is not None
    assert narrow.max_rows == 16  # 15 inputs x 8 units: the row cap binds
    assert wide.max_rows == SINGLE_THREAD_GEMM // (4096 * 15) < 16
    assert NumpyTower.compile(_model({"hidden_units": [65_536]})) is None  # not even one row fits


def test_runtime_sends_small_batches_through_it_with_the_same_vectors(serving_tree: Tree) -> None:
    rt = load_runtime(find_target(settings(serving_tree)))
    assert rt.small_tower is not None  # the serving tree's model is a DSSM
    rows = rt.small_tower.max_rows
    users = list(rt.users.row)
    states = [resolve(users[i % len(users)], rt.users, None, False, None, None) for i in range(rows + 1)]
    feats = rt.tower_inputs(states)
    small, _ = rt.tower({k: v[:rows] for k, v in feats.items()})
    big, _ = rt.tower(feats)  # one row more than max_rows: the torch forward
    np.testing.assert_allclose(small, big[:rows], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(big, _torch(rt.retriever, feats), rtol=0, atol=0)
