"""The fused one-user TDM path (`TDM.one_user_logits`, `Ranker` on catalog vectors) against DESIGN §4's math written
out: /rank scores unchanged, within float tolerance, on random models and on a trained bundle."""

from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle import load_bundle
from models.embedding import Batch, FeatureEmbedding
from models.features import FeatureGroups
from models.rank import Ranker
from models.tdm import HIST_ITEM, TDM, TDMConfig
from tests.conftest import tdm_config
from training.tdm_config import parse_tdm_config
from training.tdm_trainer import TDMTrainer

torch.set_num_threads(1)

TOL = {"rtol": 1e-5, "atol": 1e-5}


def reference_logits(model: TDM, user_batch: Batch, item_batch: Batch) -> torch.Tensor:
    """(N, 2) one user's logits, the module docstring's formulas one candidate, window and position at a time: the
    attention MLP on the concatenation [s_t, q ⊙ s_t, q], the mean of a_t s_t over a window's valid positions, the
    final MLP on [r_1 .. r_L, q, u]. Deliberately the slow, obvious arithmetic."""
    s, mask = model.history(user_batch)  # (1, T, C), (1, T)
    q = model.query(item_batch)  # (N, C)
    u = model.embedding("user", user_batch)[0] if model.user_dim else q.new_zeros(0)  # (U,)
    out = []
    for n in range(q.shape[0]):
        parts, start = [], 0
        for length in model.cfg.windows_len:
            total, valid = q.new_zeros(model.hist_dim), 0
            for t in range(start, min(start + length, s.shape[1])):
                if mask[0, t]:
                    x = torch.cat([s[0, t], q[n] * s[0, t], q[n]])[None]  # (1, 3C)
                    total = total + model.attention_out(model.attention(x))[0, 0] * s[0, t]
                    valid += 1
            parts.append(total / max(valid, 1))
            start += length
        out.append(model.final(torch.cat([*parts, q[n], u])[None])[0])
    return torch.stack(out)


def _random_model(history: str, batch_norm: bool) -> TDM:
    """Every item feature kind, user features, two attention layers; BatchNorm (eval) with non-trivial statistics.
    The "hist" history is 12 wide, the query 8: it is zero-padded."""
    groups = FeatureGroups.model_validate(
        {
            "user": [{"name": "region", "kind": "id", "embedding_dim": 3}, {"name": "age", "kind": "dense"}],
            "item": [
                {"name": "item_id", "kind": "id", "embedding_dim": 4},
                {"name": "tags", "kind": "multi_id", "embedding_dim": 3, "max_len": 3},
                {"name": "price", "kind": "dense"},
            ],
            "hist": [
                {"name": "hist", "kind": "sequence", "shared_with": "item_id", "embedding_dim": 4},
                {"name": "hist_more", "kind": "sequence", "shared_with": "item_id", "embedding_dim": 4},
                {"name": "hist_last", "kind": "sequence", "shared_with": "item_id", "embedding_dim": 4},
            ],
        }
    )
    tower = {"activation": "prelu", "batch_norm": batch_norm, "dropout": 0.2 if batch_norm else 0.0}
    cfg = TDMConfig.model_validate(
        {
            "type": "tdm",
            "history": history,
            "windows_len": [1, 2, 3],
            "attention": {"hidden_units": [5, 3], **tower},
            "final": {"hidden_units": [7], **tower},
        }
    )
    torch.manual_seed(0)
    model = TDM(cfg, FeatureEmbedding(groups, {"item_id": 20, "tags": 9, "region": 4}, init_std=0.5))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
            if isinstance(module, torch.nn.PReLU):
                module.weight.uniform_(-0.5, 0.5)
    return model.eval()


def _one_user(model: TDM, length: int, n: int, g: torch.Generator) -> tuple[Batch, Batch]:
    """A user with a `length`-item history (8 positions, left-aligned, oldest first) and n candidates."""
    hist = torch.zeros(1, 8, dtype=torch.long)
    hist[0, :length] = torch.randint(1, 20, (length,), generator=g)
    user: Batch = {
        "region": torch.randint(1, 4, (1,), generator=g),
        "age": torch.randn(1, generator=g),
        "hist": hist,
        "hist_more": torch.where(hist > 0, (hist * 7) % 19 + 1, 0),
        "hist_last": torch.where(hist > 0, (hist * 3) % 19 + 1, 0),
    }
    item: Batch = {
        "item_id": torch.randint(1, 20, (n,), generator=g),
        "tags": torch.randint(0, 9, (n, 3), generator=g),
        "price": torch.randn(n, generator=g),
    }
    if model.cfg.history == "item":  # the history items' own item features
        user[HIST_ITEM + "item_id"] = hist
        user[HIST_ITEM + "tags"] = torch.where(hist[..., None] > 0, torch.randint(1, 9, (1, 8, 3), generator=g), 0)
        user[HIST_ITEM + "price"] = torch.where(hist > 0, torch.randn(1, 8, generator=g), 0.0)
    return user, item


@pytest.mark.parametrize("history", ["item", "hist"])
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("length", [0, 1, 2, 5, 8])  # empty, inside the first windows, all windows + unread ones
def test_fused_logits_equal_the_math_written_out(history: str, batch_norm: bool, length: int) -> None:
    model = _random_model(history, batch_norm)
    user, item = _one_user(model, length, 13, torch.Generator().manual_seed(length))
    with torch.no_grad():
        want = reference_logits(model, user, item)
        assert want.abs().max() > 0.1  # not a degenerate model whose logits would match anything
        torch.testing.assert_close(model(user, item), want, **TOL)  # one user, eval: the fused path
        torch.testing.assert_close(model(user, item, fused=True), want, **TOL)
        torch.testing.assert_close(model(user, item, fused=False), want, **TOL)  # the batched path


def test_fused_path_is_for_one_user_at_inference_only() -> None:
    """Training and multi-user batches keep the batched path (BatchNorm statistics over its rows); the state_dict
    keys are the ones bundles were saved with (the extra buffer is not persistent)."""
    model = _random_model("item", batch_norm=True)
    assert not [k for k in model.state_dict() if "window" in k]
    user, item = _one_user(model, 5, 6, torch.Generator().manual_seed(1))
    calls: list[int] = []
    original = model.one_user_logits
    model.one_user_logits = lambda *a: calls.append(1) or original(*a)  # type: ignore[method-assign]
    model.train()
    model(user, item).sum().backward()
    assert not calls
    model.eval()
    with torch.no_grad():
        model(user, item)
        assert calls == [1]
        model({k: v.expand(2, *v.shape[1:]) for k, v in user.items()}, item, torch.tensor([0, 1, 1, 0, 0, 1]))
    assert calls == [1]


@pytest.fixture(scope="module")
def bundle_dir(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tdm_fused")
    result = TDMTrainer(parse_tdm_config(tdm_config(demo_dir, root / "models", None, epochs=1), "test")).fit()
    assert result.bundle is not None
    return result.bundle


def test_rank_scores_unchanged_on_a_trained_bundle(bundle_dir: Path) -> None:
    """/rank scores of the fused Ranker equal the per-request batched pass (fused=False) for known and unknown users,
    a profile given in full, stored, empty, short and over-long histories, unknown history items, 1 to 1,000
    candidates."""
    bundle = load_bundle(bundle_dir)
    fused, reference = Ranker(bundle), Ranker(bundle, fused=False)
    ids = [str(x) for x in bundle.items["item_id"].to_pylist()]
    users = [str(u) for u in bundle.users["user_id"].to_pylist()[:3]]
    rng = np.random.default_rng(0)
    cases: list[tuple[object, list[str] | None]] = [(u, None) for u in users]
    cases += [
        (users[0], []),
        (users[1], ids[:3]),
        (users[2], [str(x) for x in rng.choice(ids, 60)]),  # longer than the windows read
        ("no-such-user", ["ghost", ids[5], "ghost-2"]),
        ({"region": "north"}, ids[10:30]),
    ]
    for user, history in cases:
        for n in (1, 37, 1000):
            cands = [str(x) for x in rng.choice(ids, n, replace=False)]
            got, want = fused.score(user, history, cands), reference.score(user, history, cands)
            assert got.item_ids == want.item_ids and got.unknown_ids == want.unknown_ids
            assert np.abs(want.scores).max() > 0.1
            np.testing.assert_allclose(got.scores, want.scores, **TOL)
    got_rank, _ = fused.rank(users[0], None, ids[:200], k=10)
    want_rank, _ = reference.rank(users[0], None, ids[:200], k=10)
    assert [i for i, _ in got_rank] == [i for i, _ in want_rank]
