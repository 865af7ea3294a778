"""Serving-side TDM scoring (DESIGN §7 `/rank`): one user's candidates scored in one batched forward pass.

Loadable without `training/`: the bundle's own encodings, item table and user table are all it needs.

    ranker = Ranker(load_bundle("artifacts/models/tdm_beauty"))
    scored = ranker.score("u42", history=None, candidate_ids=["i1", "i7", "i9"])
    scored.item_ids, scored.scores, scored.unknown_ids

Unknown candidate ids are returned in `unknown_ids` and take no part in the forward pass: they are never dropped
silently and never scored as padding or as the out-of-vocabulary row.
"""

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch

from models.bundle import ModelBundle
from models.errors import QuiverError
from models.inputs import history_codes, item_features, to_batch
from models.match import MatchModel
from models.tdm import TDM, history_item_features

MAX_CANDIDATES = 1000


class Scored(NamedTuple):
    item_ids: list[str]  # the known candidates, in request order
    scores: np.ndarray  # (len(item_ids),) float32 click log-odds, higher = better
    unknown_ids: list[str]  # candidates not in the bundle's catalog, in request order


def ranker_model(bundle: ModelBundle) -> TDM:
    if not isinstance(bundle.model, TDM):
        raise QuiverError(f"{bundle.path}: a {bundle.manifest.get('model_type')} bundle, not a tdm ranker")
    return bundle.model


def retriever_model(bundle: ModelBundle) -> MatchModel:
    if not isinstance(bundle.model, MatchModel):
        raise QuiverError(f"{bundle.path}: a {bundle.manifest.get('model_type')} bundle, not a two-tower retriever")
    return bundle.model


class Ranker:
    """A loaded TDM bundle with its catalog features encoded once, ready to score requests.

    fused (default): every catalog item's vector (what the model embeds a candidate or a history item as) is computed
    here, once, and a request runs `TDM.one_user_logits` on rows of that table: no per-request feature encoding or
    embedding of candidates and history items. The vectors are the model's at construction, so a Ranker is built
    after the weights are final (a bundle's are). fused=False runs the batched forward pass on encoded features per
    request instead: the reference the fused path is tested and benchmarked against."""

    def __init__(self, bundle: ModelBundle, device: torch.device | str = "cpu", fused: bool = True) -> None:
        self.bundle = bundle
        self.model = ranker_model(bundle).eval()
        self.device = torch.device(device)
        self.model.to(self.device)
        self.item_feats = item_features(bundle.encoder, bundle.items)  # each (I, ...)
        # Row I: an item outside the catalog, encoded as all-null features (out-of-vocabulary ids, mean dense values);
        # only a history may hold one (an unknown candidate is reported, never scored).
        items = bundle.items
        nulls = pa.table({c: pa.nulls(1, items.schema.field(c).type) for c in items.column_names})
        unknown = bundle.encoder.encode_table("item", nulls, 1)
        self.hist_item_feats = {k: np.concatenate([v, unknown[k]]) for k, v in self.item_feats.items()}  # (I + 1, ...)
        self.unknown_row = items.num_rows  # I
        self.item_row = {str(x): i for i, x in enumerate(bundle.items["item_id"].to_pylist())}
        self.user_row = {str(x): i for i, x in enumerate(bundle.users["user_id"].to_pylist())}
        self.user_columns = sorted({f.source for f in bundle.encoder.groups.user} | {"user_id"})
        self.history_len = self.model.cfg.history_len
        self.item_vectors = self._catalog_vectors() if fused else None  # (I + 1, C), row I = an unknown item

    @torch.no_grad()
    def _catalog_vectors(self, batch: int = 65536) -> torch.Tensor:
        """(I + 1, C) the model's query vector of every catalog item and of the unknown item (row I), in batches so
        that a multi_id feature's (batch, M, E) lookup stays bounded."""
        n = self.unknown_row + 1
        parts = [
            self.model.query(to_batch(self.hist_item_feats, slice(s, min(s + batch, n)), self.device))
            for s in range(0, n, batch)
        ]
        return torch.cat(parts)

    def profile(self, user: str | Mapping[str, object]) -> tuple[pa.Table, list[str]]:
        """One-row table of the user group's source columns, and the stored history (oldest first; [] if none).

        A user id known to the bundle brings their stored profile and history; an unknown id gets null profile
        columns (out-of-vocabulary codes). A mapping is a profile given in full by the caller."""
        if isinstance(user, Mapping):
            row = {c: [None if user.get(c) is None else str(user.get(c))] for c in self.user_columns}
            return pa.table({c: pa.array(v, pa.string()) for c, v in row.items()}), []
        r = self.user_row.get(str(user))
        users = self.bundle.users
        if r is None:
            cols = {
                c: pa.nulls(1, users.schema.field(c).type if c in users.column_names else pa.string())
                for c in self.user_columns
            }
            cols["user_id"] = pa.array([str(user)], pa.string())
            return pa.table(cols), []
        table = users.slice(r, 1)
        history = table["history"][0].as_py() if "history" in table.column_names else None
        return table.select([c for c in self.user_columns if c in table.column_names]), list(history or [])

    @torch.inference_mode()
    def score(
        self,
        user: str | Mapping[str, object],
        history: Sequence[str] | None,
        candidate_ids: Sequence[str],
    ) -> Scored:
        """Score 1..1000 candidates of one user. history: item ids oldest first (None: the bundle's stored history
        of that user). Raises QuiverError on an empty or too long candidate list."""
        if len(candidate_ids) == 0:
            raise QuiverError("candidates: empty list (give 1 to 1000 item ids)")
        if len(candidate_ids) > MAX_CANDIDATES:
            raise QuiverError(f"candidates: {len(candidate_ids)} item ids, at most {MAX_CANDIDATES} per request")
        profile, stored = self.profile(user)
        hist = stored if history is None else [str(x) for x in history]
        known, rows, unknown = [], [], []
        for c in candidate_ids:
            r = self.item_row.get(str(c))
            if r is None:
                unknown.append(str(c))
            else:
                known.append(str(c))
                rows.append(r)
        if not rows:
            return Scored([], np.zeros(0, dtype=np.float32), unknown)
        if self.item_vectors is not None:
            scores = self._fused_scores(profile, hist, rows)
        else:
            scores = self.model.score(self.user_batch(profile, hist), self.item_batch(rows), fused=False)  # (N,)
        return Scored(known, scores.float().cpu().numpy(), unknown)

    def user_batch(self, profile: pa.Table, hist: Sequence[str]) -> dict[str, torch.Tensor]:
        """The model's user-side inputs for one user: profile features, history codes (1, Tw) and, for the "item"
        history, the history items' item features (1, Tw, ...)."""
        enc = self.bundle.encoder
        feats = enc.encode_table("user", profile, 1) | history_codes(enc, [hist], self.history_len)  # (1, ...)
        if self.model.cfg.history == "item":
            hist_rows = np.full((1, self.history_len), -1, dtype=np.int64)  # left-aligned like history_codes
            kept = self._history_rows(hist)
            hist_rows[0, : len(kept)] = kept
            feats |= history_item_features(self.hist_item_feats, hist_rows)
        return to_batch(feats, slice(None), self.device)

    def _history_rows(self, hist: Sequence[str]) -> list[int]:
        """Catalog rows of the latest history_len items, oldest first; an item outside the catalog is row I."""
        kept = hist[-self.history_len :] if self.history_len > 0 else []
        return [self.item_row.get(h, self.unknown_row) for h in kept]

    def item_batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """The model's item-side inputs: item features (N, ...) of catalog rows."""
        return to_batch(self.item_feats, np.asarray(rows, dtype=np.int64), self.device)  # (N, ...)

    def _fused_scores(self, profile: pa.Table, hist: Sequence[str], rows: list[int]) -> torch.Tensor:
        """(N,) scores from the catalog vectors. The "item" history reads them too: every kept history position
        is valid (an unknown id is row I, never padding), most recent first; the "hist" history and the user
        features still go through their encodings."""
        assert self.item_vectors is not None
        model = self.model
        q = self.item_vectors[torch.as_tensor(rows, device=self.device)]  # (N, C)
        if model.cfg.history == "item":
            hist_rows = torch.as_tensor(self._history_rows(hist)[::-1], dtype=torch.int64, device=self.device)
            s = self.item_vectors[hist_rows]  # (T, C) most recent first
            mask = torch.ones(s.shape[0], dtype=torch.bool, device=self.device)  # (T,)
            user_batch = to_batch(self.bundle.encoder.encode_table("user", profile, 1), slice(None), self.device)
        else:
            user_batch = self.user_batch(profile, hist)
            s, mask = (x[0] for x in model.history(user_batch))  # (T, C), (T,)
        u = model.embedding("user", user_batch)[0] if model.user_dim else None  # (U,)
        logits = model.one_user_logits(s, mask, q, u)  # (N, 2)
        return logits[:, 1] - logits[:, 0]

    def rank(
        self,
        user: str | Mapping[str, object],
        history: Sequence[str] | None,
        candidate_ids: Sequence[str],
        k: int | None = None,
    ) -> tuple[list[tuple[str, float]], list[str]]:
        """Known candidates sorted by score, best first (ties keep request order), at most k; and the unknown ids."""
        s = self.score(user, history, candidate_ids)
        order = np.argsort(-s.scores, kind="stable")[: k if k is not None else None]
        return [(s.item_ids[i], float(s.scores[i])) for i in order], s.unknown_ids


def score(
    bundle: ModelBundle | Ranker,
    user: str | Mapping[str, object],
    history: Sequence[str] | None,
    candidate_ids: Sequence[str],
) -> Scored:
    """One-off scoring; a server keeps a `Ranker` instead, which encodes the catalog once."""
    ranker = bundle if isinstance(bundle, Ranker) else Ranker(bundle)
    return ranker.score(user, history, candidate_ids)
