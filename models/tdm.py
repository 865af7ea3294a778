"""TDM reranker (DESIGN §4): a pointwise (user, item) click scorer built on a multi-window DIN encoder.

For each candidate item q and the user's history s_1..s_T (most recent first):

    a_t = PReLU(Linear(MLP([s_t, q ⊙ s_t, q])))          unnormalised (no softmax), 0 at padded positions
    r_l = Σ_{t in window l, valid} a_t s_t / #valid(l)    consecutive windows of `windows_len` positions; 0 if none
    x   = [r_1 .. r_L, q, user features]                  ((L + 1)·C + U,)
    logits = final_MLP(x)                                (2,) softmax cross-entropy, class 1 = click

What a history position s_t holds (`history`):
  - "item" (default): the history item's full item-group features (id, attributes, price, ...), embedded exactly as
    the candidate is. Query and history then share one space and C = the item width (the zero-pad is a no-op). The
    caller adds the history items' item features to the user batch under `HIST_ITEM + name` (`history_item_features`).
  - "hist": the `features.hist` sequence embeddings (item ids only, in Quiver's feature layer); C = their width and the
    query (item features) must fit in it.

Quiver's history matrices are oldest first, left-aligned and 0-padded (`EncodedData.user_batch`,
`models.inputs.history_codes`); `TDM.history` reverses every row's valid prefix so that position 0 is the latest item.
Callers always pass the oldest-first matrices.
"""

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from models.embedding import Batch, FeatureEmbedding
from models.mlp import MLP, TowerConfig

HIST_ITEM = "hist_item:"  # user-batch key prefix of the history items' item features ("item" history)


class TDMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["tdm"]
    history: Literal["item", "hist"] = "item"
    windows_len: list[int] = Field(default_factory=lambda: [1, 1, 1, 2, 2, 2, 5, 6, 10, 20], min_length=1)
    attention: TowerConfig = Field(default_factory=lambda: TowerConfig(hidden_units=[36], activation="prelu"))
    final: TowerConfig = Field(default_factory=lambda: TowerConfig(hidden_units=[256, 128, 64], activation="prelu"))

    @field_validator("windows_len")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v):
            raise ValueError(f"every window length must be >= 1, got {v}")
        return v

    @property
    def history_len(self) -> int:
        """Positions the windows cover: older history items are never read."""
        return sum(self.windows_len)


def window_matrix(windows_len: list[int]) -> torch.Tensor:
    """(L, T) 0/1: row l marks the positions of window l, windows consecutive from position 0 (the latest item)."""
    ends = torch.tensor(windows_len).cumsum(0)  # (L,)
    starts = ends - torch.tensor(windows_len)
    t = torch.arange(int(ends[-1]))  # (T,)
    return ((t[None, :] >= starts[:, None]) & (t[None, :] < ends[:, None])).float()


def recent_first(codes: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) left-aligned oldest-first codes (0 = padding) -> the same items most recent first, still left-aligned.

    Row [a, b, c, 0] becomes [c, b, a, 0]: position j reads position n - 1 - j of the valid prefix of length n.
    With x (B, T, ...), x is reordered the same way (its padded positions zeroed) instead of the codes.
    """
    n = (codes != 0).sum(1, keepdim=True)  # (B, 1)
    src = n - 1 - torch.arange(codes.shape[1], device=codes.device)[None, :]  # (B, T)
    x = codes if x is None else x
    rows = torch.arange(x.shape[0], device=x.device)[:, None]  # (B, 1)
    out = x[rows, src.clamp_min(0)]  # (B, T, ...)
    keep = (src >= 0).reshape(*src.shape, *([1] * (x.dim() - 2)))
    return torch.where(keep, out, torch.zeros_like(out))


def history_item_features(item_feats: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Item features of history items for the "item" history: rows (B, T) catalog rows, -1 = padding ->
    {HIST_ITEM + name: (B, T, ...)}; padded positions hold zeros (the model masks them anyway)."""
    valid = rows >= 0
    out = {}
    for name, values in item_feats.items():
        x = values[np.where(valid, rows, 0)]  # (B, T, ...)
        out[HIST_ITEM + name] = np.where(valid.reshape(*valid.shape, *([1] * (x.ndim - 2))), x, np.zeros_like(x))
    return out


class TDM(nn.Module):
    """Scores (user, candidate) pairs. A batch holds B user rows (profile + history) and N candidates; `user_index`
    (N,) names each candidate's user row, so one user's history is embedded once for all of their candidates."""

    similarity = None  # not a two-tower model: there is no vector index to match

    def __init__(self, cfg: TDMConfig, embedding: FeatureEmbedding) -> None:
        super().__init__()
        groups = embedding.groups
        if not groups.hist:
            raise ValueError("features.hist: the TDM model needs a history (sequence) feature")
        self.cfg = cfg
        self.embedding = embedding
        self.query_dim = embedding.group_dim("item")
        self.hist_dim = self.query_dim if cfg.history == "item" else sum(f.embedding_dim for f in groups.hist)  # C
        if self.query_dim > self.hist_dim:
            raise ValueError(
                f"features.item: the TDM query ({self.query_dim} dims of item features) must not be wider than the "
                f"history ({self.hist_dim} dims of features.hist); it is zero-padded to the history width "
                "(model.history: item embeds history items with the item features instead)"
            )
        self.user_dim = embedding.group_dim("user") if groups.user else 0
        c, n_windows = self.hist_dim, len(cfg.windows_len)
        self.attention = MLP(3 * c, cfg.attention, 1)
        self.attention_out = nn.PReLU()
        self.final = MLP((n_windows + 1) * c + self.user_dim, cfg.final, 2)
        self.register_buffer("windows", window_matrix(cfg.windows_len), persistent=False)  # (L, Tw)
        self.register_buffer("window_of", self.windows.argmax(0), persistent=False)  # (Tw,) each position's window

    def history(self, user_batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) oldest-first codes of each hist feature -> s (B, Tw, C) most recent first, mask (B, Tw) bool.

        The reversal to most-recent-first happens here, so every caller keeps Quiver's oldest-first matrices."""
        tw = self.cfg.history_len
        hist = self.embedding.groups.hist
        codes = user_batch[hist[0].name]  # (B, T) the positions; every hist feature has the same ones
        mask = recent_first(codes)[:, :tw] != 0  # (B, min(T, Tw)): the latest Tw items
        if self.cfg.history == "item":
            feats = {
                f.name: recent_first(codes, user_batch[HIST_ITEM + f.name])[:, :tw] for f in self.embedding.groups.item
            }
            return self.embed_items(feats), mask  # (B, T', C)
        parts = [self.embedding.lookup(f, recent_first(user_batch[f.name])[:, :tw]) for f in hist]  # (B, T', E_f)
        return torch.cat(parts, dim=-1), mask

    def embed_items(self, feats: Batch) -> torch.Tensor:
        """Item-group features with any leading shape (...,) -> (..., Dq): id -> its embedding, multi_id (..., M) ->
        mean over its non-padding values, dense -> the value. Candidates and history items go through this alike."""
        parts = []
        for f in self.embedding.groups.item:
            x = feats[f.name]
            if f.kind == "dense":
                parts.append(x.float().unsqueeze(-1))
            elif f.kind == "multi_id":
                m = (x != 0).unsqueeze(-1).float()  # (..., M, 1)
                parts.append((self.embedding.lookup(f, x) * m).sum(-2) / m.sum(-2).clamp_min(1.0))
            else:
                parts.append(self.embedding.lookup(f, x))
        return torch.cat(parts, dim=-1)

    def query(self, item_batch: Batch) -> torch.Tensor:
        """Candidate item features (N, Dq) zero-padded to the history width: (N, C)."""
        q = self.embed_items(item_batch)
        return nn.functional.pad(q, (0, self.hist_dim - q.shape[1]))

    def _split_first_layer(self, s: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention MLP's first layer on [s, q⊙s, q] is W [s; q⊙s; q] + b = W_s s + W_qs (q⊙s) + W_q q + b: the
        W_s s term depends on the user only and W_q q on the candidate only, so each is computed once; only the q⊙s
        term is paid per (candidate, position). Same numbers as the MLP on the concatenation.
        Returns W_s s (B, T, H), W_q q + b (N, H) and W_qs (H, C)."""
        first = self.attention[0]
        assert isinstance(first, nn.Linear)
        w_s, w_qs, w_q = first.weight.split(self.hist_dim, dim=1)  # each (H, C)
        return s @ w_s.T, q @ w_q.T + first.bias, w_qs

    def _attention_rest(self, h: torch.Tensor) -> torch.Tensor:
        """(M, H) first-layer outputs -> (M, 1) weights: the MLP after its first Linear (2-D, for BatchNorm1d), then
        PReLU."""
        for layer in list(self.attention)[1:]:
            h = layer(h)
        return self.attention_out(h)

    def attention_weights(
        self, s: torch.Tensor, mask: torch.Tensor, q: torch.Tensor, user_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense: a (N, T, 1), the masked unnormalised weights (0 at padding); s_n (N, T, C) and m (N, T), each
        candidate's user history. Broadcasts (no copy) when one user's candidates share a history."""
        h_user, h_item, w_qs = self._split_first_layer(s, q)  # (B, T, H), (N, H), (H, C)
        s_n, h_user, m = _per_candidate(user_index, q.shape[0], s, h_user, mask)  # (N, T, C), (N, T, H), (N, T)
        h = h_user + (q[:, None, :] * s_n) @ w_qs.T + h_item[:, None, :]  # (N, T, H)
        n, t, hdim = h.shape
        a = self._attention_rest(h.reshape(n * t, hdim)).reshape(n, t, 1)
        return a * m.unsqueeze(-1).to(a.dtype), s_n, m  # masked: padded positions weigh exactly 0

    def attention_pairs(
        self, s: torch.Tensor, mask: torch.Tensor, q: torch.Tensor, user_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed: the weight a (P, 1) of every valid (candidate, position) pair and nothing for padding, with the
        pairs' candidate (P,) and position (P,) indices and history vectors s_p (P, C)."""
        h_user, h_item, w_qs = self._split_first_layer(s, q)  # (B, T, H), (N, H), (H, C)
        (user_of,) = _per_candidate(user_index, q.shape[0], torch.arange(s.shape[0], device=s.device))  # (N,)
        cand, pos = mask[user_of].nonzero(as_tuple=True)  # (P,), (P,)
        row = user_of[cand]  # (P,) user row of each pair
        s_p = s[row, pos]  # (P, C)
        h = h_user[row, pos] + (q[cand] * s_p) @ w_qs.T + h_item[cand]  # (P, H)
        return self._attention_rest(h), cand, pos, s_p

    def encode(
        self,
        s: torch.Tensor,
        mask: torch.Tensor,
        q: torch.Tensor,
        user_index: torch.Tensor | None,
        packed: bool | None = None,
    ) -> torch.Tensor:
        """Multi-window DIN output concat(r_1..r_L, q): (N, (L + 1)·C).

        Two layouts, the same numbers. Packed computes only valid (candidate, position) pairs, so a training click
        pays for its own history, not the padded width (Beauty's median user has 6 items for 50 positions: 3x
        faster epochs). Dense broadcasts one user's history over all of their candidates, which beats gathering
        when nearly every position is valid (serving one user, 1,000 candidates: 2.5x faster than packed).
        packed=None picks packed when fewer than half the (candidate, position) cells are valid.
        """
        n, n_windows = q.shape[0], len(self.cfg.windows_len)
        if packed is None:
            (valid,) = _per_candidate(user_index, n, mask.sum(1))  # (N,) valid positions of each candidate
            packed = 2 * int(valid.sum()) < n * s.shape[1]
        if not packed:
            a, s_n, m = self.attention_weights(s, mask, q, user_index)  # (N, T, 1), (N, T, C), (N, T)
            w = self.windows[:, : s.shape[1]]  # (L, T): windows past the history length are empty
            pooled = torch.einsum("lt,ntc->nlc", w, a * s_n)  # (N, L, C) sum of a_t s_t per window
            count = torch.einsum("lt,nt->nl", w, m.to(s.dtype))  # (N, L) valid positions per window
        else:
            a, cand, pos, s_p = self.attention_pairs(s, mask, q, user_index)  # (P, 1), (P,), (P,), (P, C)
            slot = cand * n_windows + self.window_of[pos]  # (P,) flat (candidate, window) of each pair
            pooled = s.new_zeros(n * n_windows, s.shape[2]).index_add_(0, slot, a * s_p).view(n, n_windows, -1)
            count = torch.bincount(slot, minlength=n * n_windows).to(s.dtype).view(n, n_windows)
        r = pooled / count.clamp_min(1.0).unsqueeze(-1)  # (N, L, C); a window with no valid position stays 0
        return torch.cat([r.flatten(1), q], dim=-1)

    def forward(
        self,
        user_batch: Batch,
        item_batch: Batch,
        user_index: torch.Tensor | None = None,
        fused: bool | None = None,
    ) -> torch.Tensor:
        """(N, 2) logits. user_index (N,) int64 rows of user_batch; None: N == B, or B == 1 (one user's candidates).

        fused=None takes `one_user_logits` for one user's candidates at inference (serving's case) and `encode` +
        `final` otherwise; fused=False forces the latter, the reference the fused path is tested against."""
        s, mask = self.history(user_batch)  # (B, T, C), (B, T)
        q = self.query(item_batch)  # (N, C)
        if fused is None:
            fused = user_index is None and s.shape[0] == 1 and not self.training
        if fused:
            u = self.embedding("user", user_batch)[0] if self.user_dim else None  # (U,)
            return self.one_user_logits(s[0], mask[0], q, u)
        x = self.encode(s, mask, q, user_index)  # (N, (L + 1) C)
        if self.user_dim:
            (u,) = _per_candidate(user_index, q.shape[0], self.embedding("user", user_batch))  # (N, U)
            x = torch.cat([x, u], dim=-1)
        return self.final(x)

    def one_user_logits(
        self, s: torch.Tensor, mask: torch.Tensor, q: torch.Tensor, u: torch.Tensor | None
    ) -> torch.Tensor:
        """(N, 2) logits of one user's N candidates: s (T, C) most recent first, mask (T,), q (N, C), u (U,) or None.

        The same function as `encode` + `final`, regrouped so that nothing of size N·T·C is materialised (serving
        200 candidates: the attention cost 6x a plain MLP on the batched path, see bench/rank_latency.py):
          - attention, first layer: W_s s_t + W_qs (q ⊙ s_t) + W_q q + b = q · (W_qs ⊙ s_t + W_q) + (W_s s_t + b), so
            one (N, C) x (C, T'·H) product against per-position keys gives every (candidate, position) pre-activation;
          - windows + the final MLP's first layer: W_r r = Σ_t a_t (W_r,window(t) s_t / #valid(window(t))) is linear
            in the weights a, so the per-position (T', F) matrix M is built once per request and each candidate
            pays a (T',) x (T', F) product instead of pooling L windows of C dims and an (L·C) x F product.
        Only valid positions (T' of them) are computed, so a short history costs less. Inference only: in training
        a BatchNorm in the attention MLP would take its statistics over other rows than the batched path's."""
        n, c, n_windows = q.shape[0], self.hist_dim, len(self.cfg.windows_len)
        pos = mask.nonzero().squeeze(1)  # (T',) valid positions, ascending, so grouped by window
        s_v = s.index_select(0, pos)  # (T', C)
        t = pos.shape[0]
        if t:
            first = self.attention[0]
            assert isinstance(first, nn.Linear)
            hdim = first.out_features
            w_s, w_qs, w_q = first.weight.split(c, dim=1)  # each (H, C)
            keys = torch.addcmul(w_q, s_v[:, None, :], w_qs).view(t * hdim, c)  # (T'·H, C)
            bias = torch.addmm(first.bias, s_v, w_s.T).view(t * hdim)  # (T'·H,)
            pre = torch.addmm(bias, q, keys.T)  # (N, T'·H) the first layer's output per (candidate, position)
            a = self._attention_rest(pre.view(n * t, hdim)).view(n, t)  # (N, T')
        else:
            a = q.new_zeros(n, 0)
        head = self.final[0]  # the final MLP's first Linear, on [r_1 .. r_L, q, u]
        assert isinstance(head, nn.Linear)
        w_r = head.weight[:, : n_windows * c].view(-1, n_windows, c)  # (F, L, C)
        window = self.window_of.index_select(0, pos)  # (T',)
        counts = torch.bincount(window, minlength=n_windows).to(s.dtype)  # (L,) valid positions per window
        s_v = s_v / counts.index_select(0, window)[:, None]  # (T', C): each position's share of its window's mean
        per_window, start = [], 0
        for w, k in enumerate(counts.long().tolist()):
            if k:
                per_window.append(s_v[start : start + k] @ w_r[:, w].T)  # (k, F)
                start += k
        m = torch.cat(per_window) if per_window else s_v.new_zeros(0, head.out_features)  # (T', F)
        bias_head = head.bias if u is None else torch.addmv(head.bias, head.weight[:, (n_windows + 1) * c :], u)
        h = torch.addmm(bias_head, a, m).addmm_(q, head.weight[:, n_windows * c : (n_windows + 1) * c].T)  # (N, F)
        for layer in list(self.final)[1:]:
            h = layer(h)
        return h

    def score(
        self,
        user_batch: Batch,
        item_batch: Batch,
        user_index: torch.Tensor | None = None,
        fused: bool | None = None,
    ) -> torch.Tensor:
        """(N,) click log-odds logit_1 - logit_0: same order as the softmax probability, without its saturation."""
        logits = self(user_batch, item_batch, user_index, fused)
        return logits[:, 1] - logits[:, 0]


def _per_candidate(user_index: torch.Tensor | None, n: int, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each (B, ...) user-side tensor as (N, ...): gathered by user_index, broadcast (no copy) when B == 1."""
    out = []
    for x in xs:
        if user_index is not None:
            out.append(x[user_index])
        elif x.shape[0] == n:
            out.append(x)
        elif x.shape[0] == 1:
            out.append(x.expand(n, *x.shape[1:]))
        else:
            raise ValueError(f"TDM: {x.shape[0]} user rows for {n} candidates and no user_index")
    return tuple(out)


def click_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over the 2 classes; labels (N,) int64 with 1 = click."""
    return nn.functional.cross_entropy(logits, labels)
