"""TDM encoder math (DESIGN §4) by hand, and AUC / grouped AUC on small vectors."""

import itertools

import numpy as np
import pytest
import torch

from models.embedding import FeatureEmbedding
from models.features import FeatureGroups
from models.tdm import TDM, TDMConfig, history_item_features, recent_first, window_matrix
from training.auc import auc, grouped_auc

torch.set_num_threads(1)

C = 2  # history width = item id width


def _model(windows: list[int], attention: list[int] | None = None, history: str = "hist") -> TDM:
    groups = FeatureGroups.model_validate(
        {
            "item": [{"name": "item_id", "kind": "id", "embedding_dim": C}],
            "hist": [{"name": "hist", "kind": "sequence", "shared_with": "item_id", "embedding_dim": C}],
        }
    )
    cfg = TDMConfig.model_validate(
        {
            "type": "tdm",
            "history": history,
            "windows_len": windows,
            "attention": {"hidden_units": attention or [4]},
            "final": {"hidden_units": [3]},
        }
    )
    torch.manual_seed(0)
    return TDM(cfg, FeatureEmbedding(groups, {"item_id": 10})).eval()


def _constant_attention(model: TDM, value: float) -> None:
    """Every attention weight becomes PReLU(value): zero weights, output bias = value."""
    with torch.no_grad():
        for p in model.attention.parameters():
            p.zero_()
        model.attention[-1].bias.fill_(value)


def _set_embeddings(model: TDM) -> torch.Tensor:
    """Row i of the item table = (i, 10 i): easy to average by hand. Row 0 (padding) stays 0."""
    table = model.embedding.tables["item_id"]
    with torch.no_grad():
        table.weight.copy_(torch.stack([torch.arange(10.0), 10 * torch.arange(10.0)], dim=1))
    return table.weight.detach()


def test_recent_first_reverses_only_the_valid_prefix() -> None:
    codes = torch.tensor([[1, 2, 3, 0], [5, 0, 0, 0], [0, 0, 0, 0], [4, 5, 6, 7]])
    expect = torch.tensor([[3, 2, 1, 0], [5, 0, 0, 0], [0, 0, 0, 0], [7, 6, 5, 4]])
    assert torch.equal(recent_first(codes), expect)
    x = torch.arange(16.0).reshape(4, 4, 1) + 1  # another tensor over the same positions follows the same order
    assert recent_first(codes, x)[0, :, 0].tolist() == [3.0, 2.0, 1.0, 0.0]


def test_window_matrix_marks_consecutive_windows() -> None:
    w = window_matrix([1, 2, 3])
    assert w.tolist() == [[1, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]


def test_window_pooling_by_hand() -> None:
    model = _model([1, 2, 3])
    e = _set_embeddings(model)
    _constant_attention(model, 2.0)  # a_t = PReLU(2) = 2 at valid positions
    q_code = 9
    # History oldest first [3, 4, 5]: most recent first [5, 4, 3]. Window 1 = {5}, window 2 = {4, 3}, window 3 = {}.
    user = {"hist": torch.tensor([[3, 4, 5, 0, 0, 0]])}
    item = {"item_id": torch.tensor([q_code])}
    s, mask = model.history(user)
    out = model.encode(s, mask, model.query(item), None)[0]  # ((3 + 1) * C,)
    expect = torch.cat([2 * e[5], 2 * (e[4] + e[3]) / 2, torch.zeros(C), e[q_code]])
    torch.testing.assert_close(out, expect)


def test_valid_length_shorter_than_a_window_divides_by_the_valid_count() -> None:
    model = _model([1, 4])
    e = _set_embeddings(model)
    _constant_attention(model, 1.0)
    # 3 items: window 1 = the latest (7); window 2 covers 4 positions but holds only 2 valid items (6, 2).
    user = {"hist": torch.tensor([[2, 6, 7, 0, 0]])}
    s, mask = model.history(user)
    out = model.encode(s, mask, model.query({"item_id": torch.tensor([1])}), None)[0]
    torch.testing.assert_close(out[:C], e[7])
    torch.testing.assert_close(out[C : 2 * C], (e[6] + e[2]) / 2)  # / 2 valid positions, not / 4


def test_empty_history_gives_zero_windows_and_the_query() -> None:
    model = _model([1, 1, 2])
    e = _set_embeddings(model)
    user = {"hist": torch.zeros(1, 4, dtype=torch.long)}
    s, mask = model.history(user)
    out = model.encode(s, mask, model.query({"item_id": torch.tensor([3])}), None)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.cat([torch.zeros(3 * C), e[3]]))
    logits = model(user, {"item_id": torch.tensor([3])})
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


def test_negative_attention_goes_through_prelu_unnormalised() -> None:
    model = _model([2])
    e = _set_embeddings(model)
    _constant_attention(model, -1.0)
    slope = float(model.attention_out.weight.detach())  # PReLU(-1) = -slope
    s, mask = model.history({"hist": torch.tensor([[1, 2]])})
    out = model.encode(s, mask, model.query({"item_id": torch.tensor([4])}), None)[0]
    torch.testing.assert_close(out[:C], -slope * (e[1] + e[2]) / 2)


def test_attention_is_masked_and_matches_the_concatenated_mlp() -> None:
    model = _model([1, 1, 2, 4], attention=[5, 3])
    user = {"hist": torch.tensor([[3, 4, 5, 0, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0, 0, 0]])}
    item = {"item_id": torch.tensor([7, 8, 9])}
    user_index = torch.tensor([0, 0, 1])
    s, mask = model.history(user)
    q = model.query(item)
    a, s_n, m = model.attention_weights(s, mask, q, user_index)  # (3, T, 1)
    assert torch.equal(a[~m], torch.zeros_like(a[~m]))  # padded positions weigh 0
    assert (a[m] != 0).all()
    a_p, cand, pos, _ = model.attention_pairs(s, mask, q, user_index)  # the packed layout: valid pairs only
    assert torch.equal(m, torch.zeros_like(m).index_put_((cand, pos), torch.tensor(True)))
    torch.testing.assert_close(a[cand, pos], a_p)
    # The split first layer equals the attention MLP on [s, q ⊙ s, q] written out directly.
    qn = q[:, None, :].expand_as(s_n)
    naive = model.attention_out(model.attention(torch.cat([s_n, qn * s_n, qn], dim=-1))) * m.unsqueeze(-1)
    torch.testing.assert_close(a, naive)


def test_packed_and_dense_pooling_equal_the_windows_written_out() -> None:
    """Both layouts of encode (valid pairs only, or every (candidate, position) cell) against DESIGN §4's windows
    written out, on random lengths (empty, shorter than a window, longer than all windows), users shared."""
    model = _model([1, 2, 3], attention=[6])
    g = torch.Generator().manual_seed(3)
    lengths = [0, 1, 2, 5, 6, 9]
    codes = torch.zeros(len(lengths), 9, dtype=torch.long)
    for b, n in enumerate(lengths):
        codes[b, :n] = torch.randint(1, 10, (n,), generator=g)
    user_index = torch.tensor([5, 0, 3, 3, 1, 2, 4, 5, 2])
    q = model.query({"item_id": torch.randint(1, 10, (9,), generator=g)})
    s, mask = model.history({"hist": codes})
    a, s_n, m = model.attention_weights(s, mask, q, user_index)  # (N, T, 1), (N, T, C), (N, T)
    r = torch.zeros(9, 3, C)  # window by window, written out
    for n in range(9):
        for l, (lo, hi) in enumerate([(0, 1), (1, 3), (3, 6)]):
            valid = m[n, lo:hi]
            if valid.any():
                r[n, l] = (a[n, lo:hi] * s_n[n, lo:hi])[valid].sum(0) / valid.sum()
    want = torch.cat([r.flatten(1), q], dim=-1)
    torch.testing.assert_close(model.encode(s, mask, q, user_index, packed=True), want)
    torch.testing.assert_close(model.encode(s, mask, q, user_index, packed=False), want)


def test_item_history_equals_hist_history_when_items_are_ids_only() -> None:
    by_hist, by_item = _model([1, 2, 4], history="hist"), _model([1, 2, 4], history="item")
    by_item.load_state_dict(by_hist.state_dict())
    codes = torch.tensor([[3, 4, 5, 6, 0, 0], [7, 0, 0, 0, 0, 0]])
    # Catalog row r has item-id code r + 2 here; history_item_features gathers codes by catalog row (-1 = padding).
    rows = np.where(codes.numpy() > 0, codes.numpy() - 2, -1)
    feats = history_item_features({"item_id": np.arange(2, 10)}, rows)
    item = {"item_id": torch.tensor([8, 9])}
    a = by_hist({"hist": codes}, item)
    b = by_item({"hist": codes} | {k: torch.from_numpy(v) for k, v in feats.items()}, item)
    torch.testing.assert_close(a, b)


def test_padding_beyond_the_windows_and_older_items_do_not_matter() -> None:
    model = _model([1, 2])  # reads the 3 latest items only
    item = {"item_id": torch.tensor([2])}
    base = model({"hist": torch.tensor([[1, 3, 4, 5]])}, item)
    older = model({"hist": torch.tensor([[8, 3, 4, 5]])}, item)  # the oldest item is the 4th latest: unread
    padded = model({"hist": torch.tensor([[1, 3, 4, 5, 0, 0, 0, 0]])}, item)
    torch.testing.assert_close(base, older)
    torch.testing.assert_close(base, padded)
    changed = model({"hist": torch.tensor([[1, 3, 4, 8]])}, item)  # the latest item does matter
    assert not torch.allclose(base, changed)


def test_query_is_zero_padded_to_the_history_width() -> None:
    groups = FeatureGroups.model_validate(
        {
            "item": [{"name": "item_id", "kind": "id", "embedding_dim": 3}],
            "hist": [
                {"name": "h1", "kind": "sequence", "shared_with": "item_id", "embedding_dim": 3},
                {"name": "h2", "kind": "sequence", "shared_with": "item_id", "embedding_dim": 3},
            ],
        }
    )
    model = TDM(TDMConfig(type="tdm", history="hist"), FeatureEmbedding(groups, {"item_id": 10}))
    q = model.query({"item_id": torch.tensor([4])})  # (1, 6): 3 item dims, then 3 zeros
    assert q.shape == (1, 6) and model.hist_dim == 6
    torch.testing.assert_close(q[0, :3], model.embedding.tables["item_id"].weight[4])
    assert torch.equal(q[0, 3:], torch.zeros(3))


def test_a_query_wider_than_the_history_is_refused() -> None:
    groups = FeatureGroups.model_validate(
        {
            "item": [{"name": "item_id", "kind": "id", "embedding_dim": 4}, {"name": "price", "kind": "dense"}],
            "hist": [{"name": "hist", "kind": "sequence", "shared_with": "item_id", "embedding_dim": 4}],
        }
    )
    with pytest.raises(ValueError, match=r"features\.item"):
        TDM(TDMConfig(type="tdm", history="hist"), FeatureEmbedding(groups, {"item_id": 10}))
    # The "item" history embeds history items with the item features: same width as the query, nothing to pad.
    model = TDM(TDMConfig(type="tdm", history="item"), FeatureEmbedding(groups, {"item_id": 10}))
    assert model.hist_dim == model.query_dim == 5


def test_item_history_uses_each_history_item_features() -> None:
    groups = FeatureGroups.model_validate(
        {
            "item": [
                {"name": "item_id", "kind": "id", "embedding_dim": 2},
                {"name": "tags", "kind": "multi_id", "embedding_dim": 2, "max_len": 3},
                {"name": "price", "kind": "dense"},
            ],
            "hist": [{"name": "hist", "kind": "sequence", "shared_with": "item_id", "embedding_dim": 2}],
        }
    )
    cfg = TDMConfig(type="tdm", history="item", windows_len=[1, 2])
    torch.manual_seed(0)
    model = TDM(cfg, FeatureEmbedding(groups, {"item_id": 10, "tags": 6})).eval()
    _constant_attention(model, 1.0)
    # Catalog rows 0..2 and their features; the history holds rows 2, 0 (oldest first), most recent = row 0.
    item_feats = {
        "item_id": np.array([3, 4, 5]),
        "tags": np.array([[2, 3, 0], [4, 0, 0], [5, 5, 2]]),
        "price": np.array([0.5, -1.0, 2.0], dtype=np.float32),
    }
    rows = np.array([[2, 0, -1]])
    user = {"hist": torch.tensor([[6, 4, 0]])} | {
        k: torch.from_numpy(v) for k, v in history_item_features(item_feats, rows).items()
    }
    s, mask = model.history(user)  # (1, 3, 5) most recent first
    as_items = model.embed_items({k: torch.from_numpy(v[[0, 2]]) for k, v in item_feats.items()})  # rows 0, 2
    torch.testing.assert_close(s[0, :2], as_items)
    assert mask.tolist() == [[True, True, False]] and torch.equal(s[0, 2], torch.zeros(5))
    tags = model.embedding.tables["tags"].weight
    torch.testing.assert_close(as_items[0, 2:4], (tags[2] + tags[3]) / 2)  # multi_id: mean of its non-pad values
    assert float(as_items[1, 4].detach()) == 2.0  # dense: the value itself


def _brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_on_small_vectors() -> None:
    assert auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.4, 0.5])) == 0.75
    assert auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5  # a tie counts one half
    assert auc(np.array([1, 0, 0]), np.array([0.3, 0.3, 0.1])) == 0.75
    assert auc(np.array([0, 1]), np.array([0.9, 0.1])) == 0.0
    assert np.isnan(auc(np.array([1, 1]), np.array([0.1, 0.2])))  # one class: undefined
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 200), rng.integers(0, 10, 200).astype(float)  # many ties
    assert auc(y, s) == pytest.approx(_brute_auc(y, s))


def test_grouped_auc_weights_users_by_samples_and_skips_one_class_users() -> None:
    groups = np.array(["a", "a", "a", "b", "b", "c", "c"])
    labels = np.array([1, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.3, 0.3, 0.1, 0.2, 0.1, 0.5, 0.6])
    # a: 0.75 over 3 samples; b: 0.0 over 2 samples; c: only positives, skipped.
    value, n = grouped_auc(groups, labels, scores)
    assert n == 2 and value == pytest.approx((0.75 * 3 + 0.0 * 2) / 5)
    perm = np.random.default_rng(1).permutation(len(groups))
    assert grouped_auc(groups[perm], labels[perm], scores[perm])[0] == pytest.approx(value)


def test_grouped_auc_matches_per_group_brute_force() -> None:
    rng = np.random.default_rng(2)
    g, y, s = rng.integers(0, 15, 300), rng.integers(0, 2, 300), rng.integers(0, 5, 300).astype(float)
    num = den = 0.0
    for u in np.unique(g):
        sel = g == u
        if 0 < y[sel].sum() < sel.sum():
            num += _brute_auc(y[sel], s[sel]) * sel.sum()
            den += sel.sum()
    assert grouped_auc(g, y, s)[0] == pytest.approx(num / den)
