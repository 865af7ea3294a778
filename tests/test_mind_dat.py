"""MIND capsule routing and label-aware attention, DAT's adaptive-mimic loss and variational dropout (DESIGN §3-4).

The routing is checked against a loop-per-user numpy reference written from the DESIGN's formulas, so the
vectorised module and the reference must agree on masks, the `b = w + agreement` update and the squash.
"""

import math
from functools import partial

import numpy as np
import pytest
import torch

from models.capsule import CapsuleRouting, active_interests, squash
from models.dat import DAT, DATConfig
from models.embedding import FeatureEmbedding
from models.features import FeatureGroups
from models.interest_choice import choose, label_aware
from models.mind import MIND, MINDConfig
from models.similarity import similarity
from models.variational_dropout import PENALTY, VariationalDropout

# ---------------------------------------------------------------- capsule routing


def test_squash_by_hand_and_at_zero() -> None:
    z = torch.tensor([[3.0, 4.0], [0.0, 0.0]], requires_grad=True)
    out = squash(z)
    # ||z|| = 5: 25 / 26 * (0.6, 0.8)
    assert torch.allclose(out[0], torch.tensor([25 / 26 * 0.6, 25 / 26 * 0.8]), atol=1e-6)
    assert torch.equal(out[1], torch.zeros(2))
    out.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_active_interests_follow_ceil_clamp_log2() -> None:
    lengths = torch.tensor([0, 1, 2, 3, 4, 5, 8, 9, 100])
    # log2: -, 0, 1, 1.58, 2, 2.32, 3, 3.17, 6.6 -> clamp to [1, 5] -> ceil
    assert active_interests(lengths, 5).tolist() == [1, 1, 1, 2, 2, 3, 3, 4, 5]
    assert active_interests(lengths, 2).tolist() == [1, 1, 1, 2, 2, 2, 2, 2, 2]


def routing_reference(x: np.ndarray, mask: np.ndarray, w: np.ndarray, b0: np.ndarray, k: int, iters: int, scale: float):
    """One user at a time, straight from DESIGN §4."""
    out = np.zeros((x.shape[0], b0.shape[1], w.shape[1]))
    for n in range(x.shape[0]):
        valid = mask[n]
        length = int(valid.sum())
        active = math.ceil(min(max(math.log2(max(length, 1)), 1), k))
        u_hat = x[n] @ w  # (T, Dc)
        unit = u_hat / np.maximum(np.linalg.norm(u_hat, axis=1, keepdims=True), 1e-12)
        b = b0[: x.shape[1]].copy()  # (T, K)
        for it in range(iters):
            logits = b * scale
            logits[:, active:] = -np.inf
            e = np.exp(logits - logits.max(1, keepdims=True))
            wts = e / e.sum(1, keepdims=True) * valid[:, None]  # (T, K)
            z = wts.T @ u_hat  # (K, Dc)
            if it < iters - 1:
                b = wts + unit @ z.T
        norm2 = (z**2).sum(1, keepdims=True)
        caps = np.sqrt(norm2) / (1 + norm2) * z
        caps[active:] = 0
        out[n] = caps
    return out


def test_routing_matches_the_reference_and_masks_padding() -> None:
    torch.manual_seed(0)
    layer = CapsuleRouting(in_dim=6, capsule_dim=4, max_k=3, max_len=8, num_iters=3, scale=20.0)
    x = torch.randn(3, 8, 6, dtype=torch.float64)
    lengths = torch.tensor([8, 3, 0])
    mask = torch.arange(8)[None, :] < lengths[:, None]
    layer = layer.double()
    caps, caps_mask = layer(x, mask)
    ref = routing_reference(
        x.numpy(), mask.numpy(), layer.bilinear.weight.detach().numpy().T, layer.routing_init.numpy(), 3, 3, 20.0
    )
    assert torch.allclose(caps, torch.from_numpy(ref), atol=1e-9)
    assert caps_mask.tolist() == [[True, True, True], [True, True, False], [True, False, False]]
    assert torch.equal(caps[1, 2], torch.zeros(4)) and torch.equal(caps[2], torch.zeros(3, 4))  # empty history
    # Whatever sits in the padded positions changes nothing.
    junk = x.clone()
    junk[~mask] = 100.0
    assert torch.allclose(layer(junk, mask)[0], caps, atol=1e-12)


def test_routing_is_deterministic_and_its_initial_logits_are_saved() -> None:
    torch.manual_seed(1)
    layer = CapsuleRouting(4, 4, max_k=2, max_len=5)
    x, mask = torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool)
    assert torch.equal(layer(x, mask)[0], layer(x, mask)[0])
    assert "routing_init" in layer.state_dict()
    torch.manual_seed(2)
    other = CapsuleRouting(4, 4, max_k=2, max_len=5)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x, mask)[0], layer(x, mask)[0])


def test_routing_refuses_a_history_longer_than_its_buffer() -> None:
    layer = CapsuleRouting(4, 4, max_k=2, max_len=5)
    with pytest.raises(ValueError, match="exceeds the routing buffer"):
        layer(torch.randn(1, 6, 4), torch.ones(1, 6, dtype=torch.bool))


def test_const_caps_num_activates_every_capsule() -> None:
    layer = CapsuleRouting(4, 4, max_k=3, max_len=5, const_caps_num=True)
    _, caps_mask = layer(torch.randn(1, 5, 4), torch.tensor([[True, False, False, False, False]]))
    assert caps_mask.tolist() == [[True, True, True]]


# ---------------------------------------------------------------- MIND

GROUPS = FeatureGroups.model_validate(
    {
        "user": [{"name": "user_id", "kind": "id", "embedding_dim": 4}],
        "item": [{"name": "item_id", "kind": "id", "embedding_dim": 8}],
        "hist": [{"name": "hist_item_id", "kind": "sequence", "shared_with": "item_id", "embedding_dim": 8}],
    }
)
SIZES = {"user_id": 10, "item_id": 20}
USERS = {
    "user_id": torch.tensor([2, 3, 4]),
    "hist_item_id": torch.tensor([[5, 6, 7, 8, 9, 0], [5, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]),
}
ITEMS = {"item_id": torch.tensor([5, 11, 12, 13, 2, 3])}


def _mind(**kw: object) -> MIND:
    torch.manual_seed(0)
    cfg = MINDConfig.model_validate({"type": "mind", "max_k": 3, "max_seq_len": 6, "output_dim": 5, **kw})
    return MIND(cfg, FeatureEmbedding(GROUPS, SIZES)).eval()


def test_mind_serves_normalised_active_interests() -> None:
    model = _mind()
    with torch.no_grad():
        vecs, mask = model.interests(USERS)
    assert vecs.shape == (3, 3, 5)
    # lengths 5, 1, 0 -> ceil(clamp(log2)) = 3, 1, 1 active interests
    assert mask.tolist() == [[True, True, True], [True, False, False], [True, False, False]]
    assert torch.allclose(vecs.norm(dim=-1), torch.ones(3, 3), atol=1e-5)
    with pytest.raises(NotImplementedError, match="interests"):
        model.user_embedding(USERS)


def test_label_aware_attention_by_hand() -> None:
    model = _mind(simi_pow=3.0)
    with torch.no_grad():
        v = model.item_embedding(ITEMS)[:3]  # (3, D) positives
        vecs, mask = model.interests(USERS)
        u = label_aware(vecs, mask, v, 3.0)
    for n in range(3):
        active = vecs[n][mask[n]]  # (k, D)
        a = torch.softmax(3.0 * active @ v[n], dim=0)  # over active interests only
        assert torch.allclose(u[n], a @ active, atol=1e-6)
    assert torch.allclose(u[1], vecs[1, 0], atol=1e-6)  # one active interest: it is the user vector


def test_mind_training_forward_backpropagates_into_the_bilinear_map() -> None:
    model = _mind().train()
    logits, aux = model(USERS, ITEMS, layout="sampled")
    assert logits.shape == (3, 1 + 3) and aux.item() == 0.0
    logits.logsumexp(1).sum().backward()
    assert model.routing.bilinear.weight.grad is not None and model.routing.bilinear.weight.grad.abs().sum() > 0


def test_best_interest_scoring_takes_each_candidates_best_active_interest() -> None:
    model = _mind(train_scoring="best_interest").eval()
    with torch.no_grad():
        v = model.item_embedding(ITEMS)  # (3 positives + 3 negatives, D)
        vecs, mask = model.interests(USERS)
        logits, _ = model(USERS, ITEMS, layout="sampled")  # (3, 1 + 3), divided by tau
    for n in range(3):
        active = vecs[n][mask[n]]  # (k, D)
        pos = (active @ v[n]).max()
        neg = (active @ v[3:].T).max(0).values  # (3,)
        expected = torch.cat([pos[None], neg]) / model.temperature
        assert torch.allclose(logits[n], expected, atol=1e-5)
    with torch.no_grad():  # in-batch: the other users' positives are the negatives
        logits, _ = model(USERS, {k: t[:3] for k, t in ITEMS.items()}, layout="in_batch")  # (3, 3)
    for n in range(3):
        expected = (vecs[n][mask[n]] @ v[:3].T).max(0).values / model.temperature
        assert torch.allclose(logits[n], expected, atol=1e-5)


def test_best_interest_by_hand_ignores_inactive_interests() -> None:
    caps = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [1.0, 0.0]]])  # (B=2, K=2, D=2)
    mask = torch.tensor([[True, True], [True, False]])  # user 1's second interest is inactive
    v = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])  # positives of users 0, 1; 2 negatives
    _, logits = choose(caps, mask, v[:2], partial(similarity, v=v, in_batch=False), "best_interest")
    # user 0: pos max(0, 1) = 1; neg (1, 0) -> max(1, 0) = 1; neg (-1, 0) -> max(-1, 0) = 0
    # user 1: only (0.6, 0.8): pos 0.8; negs 0.6 and -0.6 (the inactive (1, 0) would have scored 1.0)
    assert torch.allclose(logits, torch.tensor([[1.0, 1.0, 0.0], [0.8, 0.6, -0.6]]))


def test_best_interest_and_label_aware_agree_for_one_interest_users() -> None:
    users = {k: t[1:] for k, t in USERS.items()}  # lengths 1 and 0: one active interest each
    items = {k: t[1:] for k, t in ITEMS.items()}  # their 2 positives, then 3 negatives
    a, _ = _mind(train_scoring="best_interest").eval()(users, items, layout="sampled")
    b, _ = _mind().eval()(users, items, layout="sampled")
    assert torch.allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------- DAT


def _dat(**kw: object) -> DAT:
    torch.manual_seed(0)
    cfg = DATConfig.model_validate(
        {"type": "dat", "user_tower": {"hidden_units": [8]}, "item_tower": {"hidden_units": [8]}, "output_dim": 4} | kw
    )
    return DAT(cfg, FeatureEmbedding(GROUPS, SIZES))


def test_dat_amm_loss_by_hand_and_its_gradient_reaches_only_the_augmented_tables() -> None:
    model = _dat(amm_user_weight=0.5, amm_item_weight=2.0)
    _, aux = model(USERS, ITEMS, layout="sampled")
    with torch.no_grad():
        u, v = model.user_embedding(USERS), model.item_embedding(ITEMS)[:3]
        a_u = model.user_aug.weight[USERS["user_id"]]
        a_v = model.item_aug.weight[ITEMS["item_id"][:3]]
        unit = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
        expected = 0.5 * ((unit(a_u) - v) ** 2).sum() + 2.0 * ((unit(a_v) - u) ** 2).sum()
    assert aux.item() == pytest.approx(expected.item(), rel=1e-5)
    model.zero_grad()
    aux.backward()
    for name, p in model.named_parameters():
        touched = p.grad is not None and p.grad.abs().sum().item() > 0
        assert touched == (name in ("user_aug.weight", "item_aug.weight")), name


def test_dat_towers_read_the_augmented_vectors() -> None:
    model = _dat().eval()
    with torch.no_grad():
        before = model.user_embedding(USERS)
        model.user_aug.weight.add_(1.0)
        assert not torch.allclose(model.user_embedding(USERS), before)


def test_dat_names_a_missing_id_feature() -> None:
    with pytest.raises(ValueError, match="user_id_feature"):
        _dat(user_id_feature="nope")


# ---------------------------------------------------------------- variational dropout


def test_variational_dropout_eval_scale_and_penalty() -> None:
    vd = VariationalDropout(2)
    with torch.no_grad():
        vd.logit.copy_(torch.tensor([0.0, math.log(3.0)]))  # d = 0.5, 0.75
    vd.eval()
    a, b = torch.ones(4, 3), torch.ones(4, 2, 5)
    out = vd([a, b])
    assert torch.allclose(out[0], a * 0.5) and torch.allclose(out[1], b * 0.25)
    assert vd.penalty(4).item() == pytest.approx(PENALTY / 4 * (0.5 + 0.25))


def test_variational_dropout_training_draws_relaxed_masks() -> None:
    torch.manual_seed(0)
    vd = VariationalDropout(2).train()
    with torch.no_grad():
        vd.logit.copy_(torch.tensor([-12.0, 12.0]))  # d ~ 0: keep; d ~ 1: drop
    out = vd([torch.ones(64, 3), torch.ones(64, 3)])
    assert out[0].min().item() > 0.99 and out[1].max().item() < 0.01
    loss = vd([torch.ones(8, 3), torch.ones(8, 3)])[0].sum() + vd.penalty(8)
    loss.backward()
    assert vd.logit.grad is not None and torch.isfinite(vd.logit.grad).all()


def test_dropout_groups_feed_the_model_penalty() -> None:
    embedding = FeatureEmbedding(GROUPS, SIZES, variational_dropout=["user", "item"])
    cfg = DATConfig.model_validate({"type": "dat", "output_dim": 4, "amm_user_weight": 0, "amm_item_weight": 0})
    model = DAT(cfg, embedding)
    _, aux = model(USERS, ITEMS, layout="sampled")
    # two groups of one feature each, d = 0.5: 0.01 / 3 * (0.5 + 0.5)
    assert aux.item() == pytest.approx(PENALTY / 3 * 1.0)
