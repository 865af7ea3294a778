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
    """A loaded TDM bundle with its catalog features encoded once, ready to score requests."""

    def __init__(self, bundle: ModelBundle, device: torch.device | str = "cpu") -> None:
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
        self.item_row = {str(x): i for i, x in enumerate(bundle.items["item_id"].to_pylist())}
        self.user_row = {str(x): i for i, x in enumerate(bundle.users["user_id"].to_pylist())}
        self.user_columns = sorted({f.source for f in bundle.encoder.groups.user} | {"user_id"})
        self.history_len = self.model.cfg.history_len

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
        enc = self.bundle.encoder
        feats = enc.encode_table("user", profile, 1) | history_codes(enc, [hist], self.history_len)  # (1, ...)
        if self.model.cfg.history == "item":
            n_items = len(self.item_row)
            kept = hist[-self.history_len :] if self.history_len > 0 else []
            hist_rows = np.full((1, self.history_len), -1, dtype=np.int64)  # left-aligned like history_codes
            hist_rows[0, : len(kept)] = [self.item_row.get(h, n_items) for h in kept]
            feats |= history_item_features(self.hist_item_feats, hist_rows)
        user_batch = to_batch(feats, slice(None), self.device)
        item_batch = to_batch(self.item_feats, np.asarray(rows, dtype=np.int64), self.device)  # (N, ...)
        scores = self.model.score(user_batch, item_batch)  # (N,) one pass; the user side broadcasts
        return Scored(known, scores.float().cpu().numpy(), unknown)

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
