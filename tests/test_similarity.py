"""Similarity layout, loss and training Recall@K (DESIGN §3), and the tower / MatchModel contract (DESIGN §2, §4).

Every expected matrix below is worked out by hand in the comments.
"""

import math

import pytest
import torch
from torch import nn

from models.dssm import DSSM, DSSMConfig
from models.embedding import FeatureEmbedding
from models.features import FeatureConfig, FeatureGroups
from models.mlp import MLP, TowerConfig
from models.registry import build_model
from models.similarity import bpr_loss, hard_block, labels_for, recall_at_k, similarity, softmax_loss

# ---------------------------------------------------------------- similarity layouts


def test_in_batch_similarity_and_labels() -> None:
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    v = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    sim = similarity(u, v, in_batch=True)
    # row 0: <(1,0),(1,1)> = 1, <(1,0),(2,0)> = 2; row 1: <(0,2),(1,1)> = 2, <(0,2),(2,0)> = 0
    assert torch.equal(sim, torch.tensor([[1.0, 2.0], [2.0, 0.0]]))
    assert labels_for(sim, in_batch=True).tolist() == [0, 1]


def test_in_batch_needs_at_least_b_item_rows() -> None:
    with pytest.raises(ValueError, match="B=3"):
        similarity(torch.ones(3, 3), torch.ones(2, 3), in_batch=True)


def test_sampled_similarity_puts_the_positive_in_column_0() -> None:
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    v = torch.tensor(
        [
            [1.0, 1.0],  # positive of row 0
            [2.0, 0.0],  # positive of row 1
            [0.0, 1.0],  # negatives, shared by both rows
            [-1.0, 3.0],
            [3.0, -1.0],
        ]
    )
    sim = similarity(u, v, in_batch=False)
    # pos: <(1,0),(1,1)> = 1, <(0,2),(2,0)> = 0
    # neg row 0: <(1,0), (0,1) (-1,3) (3,-1)> = 0, -1, 3; row 1: <(0,2), ...> = 2, 6, -2
    assert torch.equal(sim, torch.tensor([[1.0, 0.0, -1.0, 3.0], [0.0, 2.0, 6.0, -2.0]]))
    labels = labels_for(sim, in_batch=False)
    assert labels.dtype == torch.long and labels.tolist() == [0, 0]


# ---------------------------------------------------------------- hard negatives

U3 = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
POS3 = [[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]
NEG1 = [[1.0, -1.0]]
HARD3 = [[3.0, 1.0], [1.0, 4.0], [-2.0, 5.0]]
# hard 0 -> user 0 slot 1, hard 1 -> user 2 slot 0, hard 2 -> user 0 slot 0; user 1 has none
HARD_IDX = [[0, 1], [2, 0], [0, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_hard_negatives_land_at_row_and_slot_with_finite_empty_cells(dtype: torch.dtype) -> None:
    u = torch.tensor(U3, dtype=dtype)
    v = torch.tensor(POS3 + NEG1 + HARD3, dtype=dtype)
    sim = similarity(u, v, in_batch=False, hard_neg_indices=torch.tensor(HARD_IDX))
    m = torch.finfo(dtype).min
    # pos: <u0,(1,0)> = 1, <u1,(0,1)> = 1, <u2,(2,2)> = 4; neg (1,-1): 1, -1, 0
    # hard: <u0,(3,1)> = 3 at (0,1); <u2,(1,4)> = 5 at (2,0); <u0,(-2,5)> = -2 at (0,0); S = max slot + 1 = 2
    expected = torch.tensor([[1, 1, -2, 3], [1, -1, m, m], [4, 0, 5, m]], dtype=dtype)
    assert sim.dtype == dtype and sim.shape == (3, 4)
    assert torch.equal(sim, expected)
    assert torch.isfinite(sim).all() and not torch.isnan(sim).any()


def test_hard_negatives_after_the_in_batch_block() -> None:
    u = torch.tensor(U3)
    v = torch.tensor(POS3 + HARD3)
    sim = similarity(u, v, in_batch=True, hard_neg_indices=torch.tensor(HARD_IDX))
    m = torch.finfo(torch.float32).min
    # in-batch u @ POS3.T: row 0 (1,0)->(1,0,2); row 1 (0,1)->(0,1,2); row 2 (1,1)->(1,1,4); then the hard block
    expected = torch.tensor([[1, 0, 2, -2, 3], [0, 1, 2, m, m], [1, 1, 4, 5, m]])
    assert torch.equal(sim, expected)


def test_hard_negative_gradient_reaches_only_their_own_users_and_rows() -> None:
    u = torch.tensor(U3, requires_grad=True)
    v = torch.tensor(POS3 + NEG1 + HARD3, requires_grad=True)
    sim = similarity(u, v, in_batch=False, hard_neg_indices=torch.tensor(HARD_IDX))
    hard = sim[:, 2:]
    filled = hard > torch.finfo(hard.dtype).min
    assert filled.tolist() == [[True, True], [False, False], [True, False]]
    hard[filled].sum().backward()  # 3 + 5 + (-2)
    # d/du0 = h0 + h2 = (3,1) + (-2,5) = (1,6); user 1 has no hard negative; d/du2 = h1 = (1,4)
    assert torch.equal(u.grad, torch.tensor([[1.0, 6.0], [0.0, 0.0], [1.0, 4.0]]))
    # positives and the sampled negative get nothing; d/dh0 = u0, d/dh1 = u2, d/dh2 = u0
    expected_v = torch.tensor([[0.0, 0.0]] * 4 + [[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    assert torch.equal(v.grad, expected_v)


def test_empty_hard_cells_get_no_gradient() -> None:
    u = torch.tensor(U3, requires_grad=True)
    hard = torch.tensor(HARD3, requires_grad=True)
    block = hard_block(u, hard, torch.tensor(HARD_IDX))
    assert block.shape == (3, 2)
    block.retain_grad()
    # every cell, empty ones included: the empty cells are constants, so they add nothing
    block.sum().backward()
    assert torch.equal(u.grad, torch.tensor([[1.0, 6.0], [0.0, 0.0], [1.0, 4.0]]))
    assert torch.equal(hard.grad, torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]]))
    assert torch.isfinite(u.grad).all() and torch.isfinite(hard.grad).all()


def test_hard_negative_loss_is_finite_and_empty_cells_have_zero_probability() -> None:
    u = torch.tensor(U3, requires_grad=True)
    v = torch.tensor(POS3 + NEG1 + HARD3)
    sim = similarity(u, v, in_batch=False, hard_neg_indices=torch.tensor(HARD_IDX))
    loss = softmax_loss(sim, labels_for(sim, in_batch=False))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(u.grad).all()
    probs = sim.softmax(dim=1)
    assert probs[1, 2:].tolist() == [0.0, 0.0] and probs[2, 3].item() == 0.0
    # row 1 is [pos 1, neg -1] once the empty cells vanish: ce = log(1 + e^-2)
    ce = torch.nn.functional.cross_entropy(sim, torch.zeros(3, dtype=torch.long), reduction="none")
    assert ce[1].item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


# ---------------------------------------------------------------- loss


def test_weighted_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 0])
    # ce0 = -log(e^2 / (e^2 + 1)) = log(1 + e^-2) = 0.126928; ce1 = log 2 = 0.693147
    ce0, ce1 = math.log(1 + math.exp(-2)), math.log(2)
    assert softmax_loss(logits, labels).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)  # 0.410038
    w = torch.tensor([3.0, 1.0])
    # mean(ce * w) / mean(w) = ((3 ce0 + ce1) / 2) / 2 = (0.380784 + 0.693147) / 4 = 0.268483
    assert softmax_loss(logits, labels, w).item() == pytest.approx((3 * ce0 + ce1) / 4, rel=1e-6)
    assert softmax_loss(logits, labels, w).item() == pytest.approx(0.268483, abs=1e-6)
    # scaling every weight leaves the loss unchanged
    assert softmax_loss(logits, labels, w * 10).item() == pytest.approx((3 * ce0 + ce1) / 4, rel=1e-6)


def test_all_zero_weights_give_zero_loss_and_zero_gradient() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = softmax_loss(logits, torch.tensor([0, 1]), torch.zeros(2))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(2, 2))


# ---------------------------------------------------------------- Recall@K


def test_recall_at_k_reference_vector() -> None:
    preds = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    # target column 0; top-2 of row 0 = columns 3, 2 (miss), of row 1 = columns 0, 1 (hit) -> 1 / 2
    hits, total = recall_at_k(preds, labels_for(preds, False), k=2)
    assert (hits, total) == (1, 2)
    assert hits / total == 0.5


def test_recall_at_k_in_batch_identity_target() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0], [4.0, 3.0, 2.0], [0.0, 9.0, 1.0]])
    # top-1: row 0 -> col 0 (hit), row 1 -> col 0 (miss, target 1), row 2 -> col 1 (miss, target 2)
    assert recall_at_k(logits, labels_for(logits, True), k=1) == (1, 3)
    # top-2: row 0 {0,1} hit, row 1 {0,1} hit, row 2 {1,2} hit
    assert recall_at_k(logits, labels_for(logits, True), k=2) == (3, 3)
    assert recall_at_k(logits, labels_for(logits, True), k=50) == (3, 3)  # K beyond the width is clamped


# ---------------------------------------------------------------- embedding


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference for FeatureEmbedding.pooled: (B, T, E), (B, T) -> (B, E); rows with no valid position give
    zeros, not NaN."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def test_masked_mean_ignores_padding_and_empty_rows_give_zeros() -> None:
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[7.0, 7.0], [8.0, 8.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    # row 0: mean of (1,2), (3,4) = (2,3); row 1: nothing valid -> (0,0), not NaN
    assert torch.equal(masked_mean(x, mask), torch.tensor([[2.0, 3.0], [0.0, 0.0]]))


def test_pooled_sequence_equals_the_masked_mean_of_its_lookups_with_the_same_gradient() -> None:
    torch.manual_seed(0)
    emb = FeatureEmbedding(_groups(), SIZES)
    f = _groups().hist[0]
    x = torch.tensor([[3, 5, 5, 0], [0, 0, 0, 0], [1, 8, 2, 7]])  # repeats, an empty row, OOV code 1
    pooled = emb.pooled(f, x)
    reference = masked_mean(emb.lookup(f, x), x != 0)
    assert torch.allclose(pooled, reference, atol=1e-7) and torch.equal(pooled[1], torch.zeros(4))
    (g1,) = torch.autograd.grad((pooled * torch.arange(4.0)).sum(), emb.table(f).weight)
    (g2,) = torch.autograd.grad((reference * torch.arange(4.0)).sum(), emb.table(f).weight)
    assert torch.allclose(g1, g2, atol=1e-7) and g1[0].abs().sum() == 0  # padding row never updated
    # row 0 averages 3 items, item 5 twice: its gradient is 2/3 of the upstream vector (0, 1, 2, 3)
    assert torch.allclose(g1[5], torch.arange(4.0) * 2 / 3, atol=1e-6)


def _groups() -> FeatureGroups:
    f = FeatureConfig
    return FeatureGroups(
        user=[f(name="user_id", kind="id", embedding_dim=4), f(name="age", kind="dense")],
        item=[f(name="item_id", kind="id", embedding_dim=4), f(name="tags", kind="multi_id", embedding_dim=3)],
        hist=[f(name="hist", kind="sequence", shared_with="item_id", embedding_dim=4)],
    )


SIZES = {"user_id": 6, "item_id": 9, "tags": 5}


def test_feature_embedding_shares_tables_pads_with_zero_and_concatenates() -> None:
    torch.manual_seed(0)
    emb = FeatureEmbedding(_groups(), SIZES)
    assert sorted(emb.tables) == ["item_id", "tags", "user_id"]  # shared and dense features own no table
    assert emb.table(_groups().hist[0]) is emb.tables["item_id"]
    assert all(torch.equal(t.weight[0], torch.zeros(t.embedding_dim)) for t in emb.tables.values())
    assert (emb.group_dim("user"), emb.group_dim("item"), emb.group_dim("hist")) == (5, 7, 4)
    batch = {
        "user_id": torch.tensor([2, 3]),
        "age": torch.tensor([0.5, -1.0]),
        "hist": torch.tensor([[4, 5, 0], [0, 0, 0]]),
    }
    user = emb("user", batch)
    assert user.shape == (2, 5)
    assert torch.equal(user[:, :4], emb.tables["user_id"].weight[[2, 3]])
    assert user[:, 4].tolist() == [0.5, -1.0]  # dense: the value itself
    hist = emb("hist", batch)
    table = emb.tables["item_id"].weight
    assert torch.allclose(hist[0], (table[4] + table[5]) / 2)  # padding excluded from the mean
    assert torch.equal(hist[1], torch.zeros(4))


# ---------------------------------------------------------------- MLP


def test_mlp_layer_structure_without_options() -> None:
    mlp = MLP(10, TowerConfig(hidden_units=[8, 4]), 3)
    assert [type(m) for m in mlp] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 8), (8, 4), (4, 3)]
    assert isinstance(mlp[-1], nn.Linear)  # no activation after the output layer
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.Dropout)) for m in mlp)


def test_mlp_layer_structure_with_batch_norm_dropout_and_activation() -> None:
    mlp = MLP(6, TowerConfig(hidden_units=[5, 4], activation="gelu", batch_norm=True, dropout=0.2), 2)
    expected = [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Dropout] * 2 + [nn.Linear]
    assert [type(m) for m in mlp] == expected
    assert [m.num_features for m in mlp if isinstance(m, nn.BatchNorm1d)] == [5, 4]
    assert all(m.p == 0.2 for m in mlp if isinstance(m, nn.Dropout))
    only_bn = MLP(6, TowerConfig(hidden_units=[5], batch_norm=True), 2)
    assert [type(m) for m in only_bn] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    only_dropout = MLP(6, TowerConfig(hidden_units=[5], activation="tanh", dropout=0.1), 2)
    assert [type(m) for m in only_dropout] == [nn.Linear, nn.Tanh, nn.Dropout, nn.Linear]
    assert [type(m) for m in MLP(6, TowerConfig(hidden_units=[]), 2)] == [nn.Linear]


# ---------------------------------------------------------------- DSSM / MatchModel


def _dssm(similarity_: str = "cosine", temperature: float = 1.0, seed: int = 0) -> DSSM:
    torch.manual_seed(seed)
    cfg = DSSMConfig.model_validate(
        {
            "type": "dssm",
            "user_tower": {"hidden_units": [8]},
            "item_tower": {"hidden_units": [8]},
            "output_dim": 5,
            "similarity": similarity_,
            "temperature": temperature,
        }
    )
    model = build_model(cfg, _groups(), SIZES)
    assert isinstance(model, DSSM)
    return model.eval()


USER_BATCH = {
    "user_id": torch.tensor([1, 2, 5]),
    "age": torch.tensor([0.0, 1.5, -0.5]),
    "hist": torch.tensor([[3, 4, 0], [8, 0, 0], [0, 0, 0]]),
}
ITEM_BATCH = {  # 3 positives, then 2 sampled negatives
    "item_id": torch.tensor([3, 4, 8, 2, 7]),
    "tags": torch.tensor([[2, 3, 0, 0, 0, 0, 0, 0]] * 5),
}


def test_dssm_tower_input_dims() -> None:
    model = _dssm()
    assert model.user_mlp[0].in_features == 4 + 1 + 4  # user_id + age + pooled history
    assert model.item_mlp[0].in_features == 4 + 3  # item_id + pooled tags
    assert model.user_mlp[-1].out_features == model.item_mlp[-1].out_features == 5


def test_cosine_outputs_have_unit_norm_and_inner_product_is_raw() -> None:
    cos, ip = _dssm("cosine"), _dssm("inner_product")
    ip.load_state_dict(cos.state_dict())
    with torch.no_grad():
        u_cos, v_cos = cos.user_embedding(USER_BATCH), cos.item_embedding(ITEM_BATCH)
        u_ip, v_ip = ip.user_embedding(USER_BATCH), ip.item_embedding(ITEM_BATCH)
    assert torch.allclose(u_cos.norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.allclose(v_cos.norm(dim=1), torch.ones(5), atol=1e-6)
    assert not torch.allclose(u_ip.norm(dim=1), torch.ones(3), atol=1e-3)
    assert not torch.allclose(v_ip.norm(dim=1), torch.ones(5), atol=1e-3)
    assert torch.allclose(u_cos, u_ip / u_ip.norm(dim=1, keepdim=True), atol=1e-6)  # same towers, normalised
    with torch.no_grad():
        logits, aux = cos(USER_BATCH, ITEM_BATCH, layout="sampled")
    assert aux.item() == 0.0  # DSSM has no auxiliary loss
    assert logits.shape == (3, 1 + 2)
    assert logits.abs().max().item() <= 1.0 + 1e-6  # cosine at tau = 1
    assert torch.allclose(logits, similarity(u_cos, v_cos, in_batch=False), atol=1e-6)


def test_temperature_divides_the_logits() -> None:
    one, half = _dssm(temperature=1.0), _dssm(temperature=0.5, seed=1)
    half.load_state_dict(one.state_dict())
    items = {k: v[:3] for k, v in ITEM_BATCH.items()}
    with torch.no_grad():
        for layout, batch in (("in_batch", items), ("sampled", ITEM_BATCH)):
            a = one(USER_BATCH, batch, layout=layout).logits
            b = half(USER_BATCH, batch, layout=layout).logits
            assert torch.equal(b, a * 2)  # x / 0.5 is exactly 2x in floating point
            assert not torch.equal(a, b)


def test_model_forward_with_hard_negatives_has_the_design_width() -> None:
    model = _dssm()
    # rows: 3 positives, 1 sampled negative, 2 hard negatives (user 2 slot 0, user 0 slot 2) -> S = 3
    items = {k: v[[0, 1, 2, 3, 4, 0]] for k, v in ITEM_BATCH.items()}
    with torch.no_grad():
        logits = model(USER_BATCH, items, layout="sampled", hard_neg_indices=torch.tensor([[2, 0], [0, 2]])).logits
    assert logits.shape == (3, 1 + 1 + 3)
    m = torch.finfo(logits.dtype).min
    filled = logits > m
    assert filled[:, :2].all()
    assert filled[:, 2:].tolist() == [[False, False, True], [False, False, False], [True, False, False]]
    with torch.no_grad():
        u, v = model.user_embedding(USER_BATCH), model.item_embedding(items)
    assert logits[0, 4].item() == pytest.approx(torch.dot(u[0], v[5]).item(), abs=1e-6)
    assert logits[2, 2].item() == pytest.approx(torch.dot(u[2], v[4]).item(), abs=1e-6)


def test_recall_at_k_counts_a_tie_with_the_target_as_a_hit() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0], [0.5, 2.0, 0.5]])
    # row 0: nothing scores above the target (column 0) -> hit at K=1; row 1: one column above it -> hit from K=2
    assert recall_at_k(logits, labels_for(logits, False), k=1) == (1, 2)
    assert recall_at_k(logits, labels_for(logits, False), k=2) == (2, 2)
    # empty hard-negative cells never outrank anything
    m = torch.finfo(torch.float32).min
    floor_row = torch.tensor([[-5.0, -6.0, m, m]])
    assert recall_at_k(floor_row, labels_for(floor_row, False), k=1) == (1, 1)


def test_bpr_loss_by_hand() -> None:
    # One row, two columns: label 0 at logit 2, the other at 0. Every draw is column 0 (the label: softplus(0), no
    # gradient) or column 1 (softplus(0 - 2) = log(1 + e^-2)); the loss is the mean over the drawn columns.
    logits = torch.tensor([[2.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0])
    torch.manual_seed(0)
    cols = torch.randint(0, 2, (1, 64))
    torch.manual_seed(0)
    loss = bpr_loss(logits, labels, 64)
    n1 = int((cols == 1).sum())
    expected = (n1 * math.log(1 + math.exp(-2)) + (64 - n1) * math.log(2)) / 64
    assert 0 < n1 < 64
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/ds1 = sigmoid(s1 - s0) per draw of column 1; the label's own draws cancel (d/ds0 only from column 1 draws)
    g = 1 / (1 + math.exp(2)) * n1 / 64
    assert logits.grad is not None
    assert logits.grad[0, 1].item() == pytest.approx(g, rel=1e-5)
    assert logits.grad[0, 0].item() == pytest.approx(-g, rel=1e-5)


def test_bpr_loss_weights_and_masked_columns() -> None:
    # A masked collision (-inf) adds nothing; zero-weight rows add nothing; scaling the weights changes nothing.
    logits = torch.tensor([[1.0, float("-inf")], [0.0, 3.0]])
    labels = torch.tensor([0, 0])
    torch.manual_seed(1)
    first = bpr_loss(logits[:1], labels[:1], 32)
    torch.manual_seed(1)
    cols = torch.randint(0, 2, (1, 32))
    assert first.item() == pytest.approx(float((cols == 0).sum()) * math.log(2) / 32, rel=1e-6)
    w = torch.tensor([1.0, 0.0])
    torch.manual_seed(2)
    a = bpr_loss(logits, labels, 32, w)
    torch.manual_seed(2)
    b = bpr_loss(logits, labels, 32, w * 7)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    torch.manual_seed(2)
    both = torch.randint(0, 2, (2, 32))
    assert a.item() == pytest.approx(float((both[0] == 0).sum()) * math.log(2) / 32, rel=1e-6)
    assert bpr_loss(logits, labels, 8, torch.zeros(2)).item() == 0.0
