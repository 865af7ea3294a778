"""SASRec and HSTU (DESIGN §4 "Sequential user towers"): one block of each computed by hand on a 3-position sequence,
the causal and padding masks, right-alignment, and what training and serving read off the encoder."""

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from models.embedding import FeatureEmbedding
from models.features import FeatureGroups
from models.hstu import HSTU, HSTUBlock, HSTUConfig
from models.sasrec import SASRec, SASRecBlock, SASRecConfig
from models.sequence import attention_mask, right_align

GROUPS = FeatureGroups.model_validate(
    {
        "item": [{"name": "item_id", "kind": "id", "embedding_dim": 8}],
        "hist": [{"name": "hist_item_id", "kind": "sequence", "shared_with": "item_id", "embedding_dim": 8}],
    }
)
SIZES = {"item_id": 30}


def _ln(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (LayerNorm affine and biases included), so a wrong term cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _allowed(valid: list[bool]) -> list[list[bool]]:
    """allowed[t][s]: query t reads key s (s <= t and s valid; a padded query reads itself)."""
    n = len(valid)
    return [[s <= t and (valid[s] or s == t) for s in range(n)] for t in range(n)]


# ---------------------------------------------------------------- masks and alignment


def test_right_align_moves_padding_left_and_keeps_item_order() -> None:
    codes = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7], [5, 0, 6, 0, 7], [0, 0, 0, 0, 0]])
    aligned = right_align(codes)
    assert aligned.tolist() == [[0, 0, 5, 6, 7], [0, 0, 5, 6, 7], [0, 0, 5, 6, 7], [0, 0, 0, 0, 0]]
    assert torch.equal(right_align(aligned), aligned)  # already right-aligned rows are unchanged


def test_attention_mask_is_causal_reads_no_padding_and_never_leaves_a_row_empty() -> None:
    valid = torch.tensor([[False, True, True]])
    mask = attention_mask(valid)[0, 0]  # (T, T)
    assert mask.tolist() == _allowed([False, True, True])
    assert mask.any(-1).all()


# ---------------------------------------------------------------- one block by hand


def _sasrec_by_hand(block: SASRecBlock, x: torch.Tensor, valid: list[bool], heads: int) -> torch.Tensor:
    """x (T, d) -> (T, d), written from DESIGN §4's formulas with plain loops over positions and heads."""
    t_len, d = x.shape
    dh = d // heads
    attn, res1, res2 = block.attn, block.attn_res, block.ffn_res
    h = _ln(x, res1.norm)
    qkv = h @ attn.qkv.weight.T + attn.qkv.bias  # (T, 3d)
    q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
    allowed = _allowed(valid)
    out = torch.zeros(t_len, d)
    for head in range(heads):
        cols = slice(head * dh, (head + 1) * dh)
        for t in range(t_len):
            keys = [s for s in range(t_len) if allowed[t][s]]
            scores = torch.stack([q[t, cols] @ k[s, cols] / math.sqrt(dh) for s in keys])
            w = torch.softmax(scores, 0)
            out[t, cols] = sum(w[i] * v[s, cols] for i, s in enumerate(keys))
    a = out @ attn.out.weight.T + attn.out.bias
    if res1.gate is not None:
        a = torch.sigmoid(h @ res1.gate.weight.T + res1.gate.bias) * a
    x1 = x + a
    h2 = _ln(x1, res2.norm)
    lin1, lin2 = block.ffn[0], block.ffn[3]
    f = F.gelu(h2 @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias
    if res2.gate is not None:
        f = torch.sigmoid(h2 @ res2.gate.weight.T + res2.gate.bias) * f
    return x1 + f


def _check_block(block: torch.nn.Module, by_hand: Callable, seed: int) -> None:
    """The module against the loops on a 3-position sequence, full and with its first position padded (the valid
    positions' outputs must not depend on the padding)."""
    block.eval()
    _randomise(block, seed)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed + 1))
    for valid in ([True, True, True], [False, True, True]):
        v = torch.tensor([valid])
        with torch.no_grad():
            got = block(x.unsqueeze(0), attention_mask(v))[0]
        expected = by_hand(block, x, valid, heads=2)
        rows = [t for t in range(3) if valid[t]]
        assert torch.allclose(got[rows], expected[rows], atol=1e-5), (got, expected)


@pytest.mark.parametrize("gated", [False, True], ids=["prenorm", "ligr"])
def test_sasrec_block_by_hand_on_three_positions(gated: bool) -> None:
    _check_block(SASRecBlock(d=4, num_heads=2, ffn_mult=2, dropout=0.0, gated=gated), _sasrec_by_hand, seed=1)


def _hstu_by_hand(block: HSTUBlock, x: torch.Tensor, valid: list[bool], heads: int) -> torch.Tensor:
    t_len, d = x.shape
    dh = d // heads
    uvqk = F.silu(_ln(x, block.norm_in) @ block.uvqk.weight.T + block.uvqk.bias)  # (T, 4d)
    u, v, q, k = (uvqk[:, i * d : (i + 1) * d] for i in range(4))
    allowed = _allowed(valid)
    av = torch.zeros(t_len, d)
    for head in range(heads):
        cols = slice(head * dh, (head + 1) * dh)
        for t in range(t_len):
            n = sum(allowed[t])
            for s in range(t_len):
                if allowed[t][s]:
                    logit = q[t, cols] @ k[s, cols] / math.sqrt(dh) + block.rab.weight[t - s]
                    av[t, cols] += F.silu(logit) / n * v[s, cols]
    y = (_ln(av, block.norm_attn) * u) @ block.out.weight.T + block.out.bias
    return x + y


def test_hstu_block_by_hand_on_three_positions() -> None:
    _check_block(HSTUBlock(d=4, num_heads=2, max_len=5, dropout=0.0), _hstu_by_hand, seed=3)


def test_hstu_weights_are_pointwise_and_scaled_by_the_valid_key_count() -> None:
    """With Q = K = 0 every weight is SiLU(rab)/n: a longer history does not add up to larger outputs."""
    block = HSTUBlock(d=4, num_heads=1, max_len=8, dropout=0.0).eval()
    with torch.no_grad():
        block.rab.weight.fill_(2.0)
    x = torch.zeros(1, 6, 4)
    v = torch.ones(1, 6, dtype=torch.bool)
    q = torch.zeros(1, 1, 6, 4)
    logits = q @ q.transpose(-1, -2) + block.rab(6)  # (1, 1, 6, 6)
    mask = attention_mask(v)
    a = F.silu(logits) * mask / mask.sum(-1, keepdim=True)
    assert torch.allclose(a.sum(-1), torch.full((1, 1, 6), F.silu(torch.tensor(2.0)).item()))
    with torch.no_grad():
        assert torch.isfinite(block(x, mask)).all()


# ---------------------------------------------------------------- whole models


def _model(kind: str, **kw: object) -> SASRec | HSTU:
    torch.manual_seed(0)
    base = {"max_seq_len": 6, "num_blocks": 2, "num_heads": 2, "dropout": 0.0} | kw
    if kind == "sasrec":
        return SASRec(SASRecConfig.model_validate({"type": "sasrec", **base}), FeatureEmbedding(GROUPS, SIZES)).eval()
    return HSTU(HSTUConfig.model_validate({"type": "hstu", **base}), FeatureEmbedding(GROUPS, SIZES)).eval()


KINDS = ["sasrec", "hstu"]


@pytest.mark.parametrize("kind", KINDS)
def test_position_t_never_sees_t_plus_one(kind: str) -> None:
    model = _model(kind)
    a = {"hist_item_id": torch.tensor([[4, 5, 6, 7, 8, 9]])}
    b = {"hist_item_id": torch.tensor([[4, 5, 6, 7, 20, 21]])}  # the last two items differ
    with torch.no_grad():
        ha, _ = model.states(a)
        hb, _ = model.states(b)
    assert torch.allclose(ha[0, :4], hb[0, :4], atol=1e-6)
    assert not torch.allclose(ha[0, 4:], hb[0, 4:], atol=1e-3)
    with torch.no_grad():  # unpadded (plain causal attention) and padded (explicit mask): the same states
        padded, _ = model.states({"hist_item_id": torch.tensor([[4, 5, 6, 7, 8, 9], [0, 0, 0, 0, 0, 1]])})
    assert torch.allclose(ha[0], padded[0], atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_the_same_history_gives_the_same_vector_whatever_its_padding(kind: str) -> None:
    """Left-aligned (evaluation, serving), right-aligned (training), padded to any width or trimmed: one vector."""
    model = _model(kind)
    layouts = [
        [[4, 5, 6, 0, 0, 0]],
        [[0, 0, 0, 4, 5, 6]],
        [[4, 5, 6]],
        [[0, 4, 5, 6]],
    ]
    with torch.no_grad():
        vectors = [model.interests({"hist_item_id": torch.tensor(x)})[0] for x in layouts]
        batch, _ = model.interests({"hist_item_id": torch.tensor([[4, 5, 6, 0, 0, 0], [7, 8, 9, 10, 11, 12]])})
    for v in vectors[1:]:
        assert torch.allclose(v, vectors[0], atol=1e-6)
    assert torch.allclose(batch[0], vectors[0][0], atol=1e-6)  # a longer row beside it changes nothing


@pytest.mark.parametrize("kind", KINDS)
def test_a_history_longer_than_max_seq_len_keeps_its_latest_items(kind: str) -> None:
    model = _model(kind)  # max_seq_len 6
    with torch.no_grad():
        long, _ = model.interests({"hist_item_id": torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9]])})
        latest, _ = model.interests({"hist_item_id": torch.tensor([[4, 5, 6, 7, 8, 9]])})
    assert torch.allclose(long, latest, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_serving_is_the_last_position_and_training_every_valid_one(kind: str) -> None:
    """Serving runs the last block for the latest query row only; every row of `states` must agree with it."""
    model = _model(kind, similarity="cosine")
    batch = {"hist_item_id": torch.tensor([[0, 0, 4, 5, 6], [0, 7, 8, 9, 10]])}
    with torch.no_grad():
        states, valid = model.states(batch)
        served, mask = model.interests(batch)
        rows, row_mask = model.train_interests(batch)
    assert served.shape == (2, 1, 8) and mask.all()
    assert torch.allclose(served[:, 0], states[:, -1])
    assert rows.shape == (3 + 4, 1, 8) and row_mask.all()  # P = the valid positions, row-major
    assert torch.allclose(rows[:, 0], states[valid])
    assert torch.allclose(rows.norm(dim=-1), torch.ones(7, 1), atol=1e-5)  # cosine: unit vectors


@pytest.mark.parametrize("kind", KINDS)
def test_the_item_tower_is_the_shared_id_table_when_nothing_else_is_asked(kind: str) -> None:
    model = _model(kind, similarity="inner_product")
    ids = torch.tensor([3, 4, 5])
    with torch.no_grad():
        v = model.item_embedding({"item_id": ids})
    assert torch.equal(v, model.embedding.tables["item_id"].weight[ids])  # tied input and output embeddings
    with_out = _model(kind, output_dim=4)
    assert with_out.item_embedding({"item_id": ids}).shape == (3, 4)
    assert with_out.interests({"hist_item_id": torch.tensor([[1, 2]])})[0].shape == (1, 1, 4)


def test_width_not_divisible_by_heads_and_user_features_are_refused() -> None:
    with pytest.raises(ValueError, match=r"model\.num_heads: 3"):
        _model("sasrec", num_heads=3)
    groups = FeatureGroups.model_validate(
        {
            "user": [{"name": "user_id", "kind": "id"}],
            "item": [{"name": "item_id", "kind": "id", "embedding_dim": 8}],
            "hist": [{"name": "hist_item_id", "kind": "sequence", "shared_with": "item_id", "embedding_dim": 8}],
        }
    )
    cfg = SASRecConfig.model_validate({"type": "sasrec"})
    with pytest.raises(ValueError, match=r"features\.user"):
        SASRec(cfg, FeatureEmbedding(groups, {"user_id": 5, "item_id": 30}))
    with pytest.raises(ValueError, match="max_seq_len"):
        SASRecConfig.model_validate({"type": "sasrec", "max_seq_len": 1})


@pytest.mark.parametrize("kind", KINDS)
def test_training_gradients_reach_the_blocks_and_the_shared_table(kind: str) -> None:
    model = _model(kind).train()
    rows, _ = model.train_interests({"hist_item_id": torch.tensor([[0, 4, 5, 6], [7, 8, 9, 10]])})
    targets = model.item_embedding({"item_id": torch.tensor([5, 6, 11, 8, 9, 10, 12])})
    (rows[:, 0] * targets).sum().backward()
    assert model.embedding.tables["item_id"].weight.grad is not None
    block_grads = [p.grad for p in model.blocks.parameters() if p.grad is not None]
    assert block_grads and any(g.abs().sum() > 0 for g in block_grads)


def test_hstu_time_buckets_by_hand() -> None:
    model = _model("hstu", time_buckets=8)
    with torch.no_grad():
        model.time_bias.copy_(torch.arange(8, dtype=torch.float32))  # bucket b has weight b
    codes = torch.tensor([[4, 5, 6]])
    times = torch.tensor([[100, 101, 1100]])  # gaps: 1 s (bucket 0), 1,000 s (bucket 9 -> clamped 7), 999 s (9 -> 7)
    bias = model.attention_bias({"hist_item_id": codes, "hist_time": times}, torch.tensor([[0, 1, 2]]))
    assert bias is not None and bias.shape == (1, 1, 3, 3)
    assert bias[0, 0].tolist() == [[0, 0, 7], [0, 0, 7], [7, 7, 0]]
    with torch.no_grad():
        a, _ = model.interests({"hist_item_id": codes, "hist_time": times})
        b, _ = model.interests({"hist_item_id": codes, "hist_time": torch.tensor([[100, 1100, 1101]])})
    assert not torch.allclose(a, b)  # the same items at other times: another user state
    left = {"hist_item_id": torch.tensor([[4, 5, 6, 0]]), "hist_time": torch.tensor([[100, 101, 1100, 0]])}
    with torch.no_grad():
        assert torch.allclose(model.interests(left)[0], a, atol=1e-6)  # timestamps follow their items' alignment
        states, _ = model.states(left)  # every query row, the time bias included
    assert torch.allclose(a[:, 0], states[:, -1], atol=1e-6)  # serving computes the last row alone: the same state
    with pytest.raises(ValueError, match="hist_time"):
        model.interests({"hist_item_id": codes})
