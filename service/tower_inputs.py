"""The user tower's inputs for a batch of user states, with the encodings that repeat memoised.

Encoding one request's features through the bundle's encoder costs more than the tower itself at batch 1: a
profile goes through a typed Arrow table (~60 µs) and the encoder's per-column lookups (~120 µs), a 30-item
history through an Arrow string array and the vocabulary or hash lookups (~100 µs; a slow 2-core host's figures).
That runs once per micro-batch (with the model process: the profiles on the HTTP process's event loop, the
histories in the child), and at light load every batch holds one or two requests. Both encodings are pure
functions of what is memoised here:

- a profile exactly as the bundle stores it (`UserState.profile_row`: no Redis field, no request feature) is
  encoded once per users.parquet row, the first time that user is served;
- an item id of the index's catalog is encoded once per index label (the history's ids are looked up in the label
  map the exclusion uses already); an id outside the catalog is encoded on every request, as before.

The memos are allocated on first use: the profiles' as zeroed pages, one row per bundle user, which the kernel maps
only when a row is written, and 8 bytes per catalog item and history feature for the items'. One encoder per
Runtime: a new triple starts with empty memos.
"""

import threading
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from models.features import FeatureConfig, FeatureEncoder
from models.inputs import history_codes, history_times, user_features
from models.sequence import HIST_TIME
from service.userstate import BundleUsers, UserState

TowerInputs = dict[str, np.ndarray]  # feature name -> (B,) or (B, L) codes / values
UNSET = -1  # a memo slot not computed yet (codes are >= 0: 0 pads, 1 is out of vocabulary)


class TowerInputEncoder:
    def __init__(
        self,
        encoder: FeatureEncoder,
        users: BundleUsers,
        rows: dict[str, int],
        n_items: int,
        history_len: int,
        reads_time: bool,
    ) -> None:
        self.encoder = encoder
        self.users = users
        self.rows = rows  # item id -> index label, in [0, n_items)
        self.n_items = n_items
        self.history_len = history_len
        self.reads_time = reads_time
        self._profiles: TowerInputs | None = None  # feature -> (U, ...) encoded profile of each users.parquet row
        self._profile_done = np.zeros(0, dtype=bool)  # (U,) rows whose encoding is in _profiles
        self._profile_lock = threading.Lock()  # batches run on executor threads: one fills the profile memo at a time
        self._items: dict[str, np.ndarray] = {}  # hist feature -> (N,) code of each index label, UNSET until needed

    def encode(self, states: Sequence[UserState]) -> TowerInputs:
        """Profile codes, (B, L) history codes (and times for a time-reading model), as the bundle's encoder gives
        them."""
        return self.profiles(states) | self.histories(states)

    def histories(self, states: Sequence[UserState]) -> TowerInputs:
        """The history group's features, (B, L) each: item codes (and click times for a time-reading model)."""
        feats = history_codes(self.encoder, [s.history for s in states], self.history_len, self.item_codes)
        if self.reads_time:  # a history without times is read as clicks at one instant (flagged degraded)
            clocks = [s.history_time if s.history_time is not None else [0] * len(s.history) for s in states]
            feats[HIST_TIME] = history_times(clocks, self.history_len)
        return feats

    def profiles(self, states: Sequence[UserState]) -> TowerInputs:
        """The user group's features, (B, ...) each: stored profiles from the memo, the others encoded now."""
        rows = np.fromiter((UNSET if s.profile_row is None else s.profile_row for s in states), np.int64, len(states))
        live = np.flatnonzero(rows == UNSET)  # profiles Redis or the request changed: encoded as they are
        if live.size == len(states):
            return self._encode_profiles([states[i].profile for i in live])
        memo = self._profile_memo(np.unique(rows[rows != UNSET]))
        out = {name: codes[np.maximum(rows, 0)] for name, codes in memo.items()}  # copies (fancy indexing)
        if live.size:
            fresh = self._encode_profiles([states[i].profile for i in live])
            for name, codes in fresh.items():
                out[name][live] = codes
        return out

    def _encode_profiles(self, profiles: list[dict]) -> TowerInputs:
        return user_features(self.encoder, self.users.profile_table(profiles))

    def _profile_memo(self, rows: np.ndarray) -> TowerInputs:
        """The memo, with these users.parquet rows in it."""
        if self._profiles is not None and self._profile_done[rows].all():
            return self._profiles  # rows are only ever added, so a row seen done stays done
        with self._profile_lock:
            need = rows[~self._profile_done[rows]] if self._profiles is not None else rows
            if need.size == 0:  # another batch filled them while this one waited
                return self._profiles
            fresh = user_features(self.encoder, self.users.rows_table(need.tolist()))
            if self._profiles is None:
                n = self.users.table.num_rows
                self._profile_done = np.zeros(n, dtype=bool)
                self._profiles = {name: np.zeros((n, *v.shape[1:]), dtype=v.dtype) for name, v in fresh.items()}
            for name, codes in fresh.items():
                self._profiles[name][need] = codes
            self._profile_done[need] = True  # after the codes: a reader outside the lock sees done only once written
        assert self._profiles is not None
        return self._profiles

    def item_codes(self, f: FeatureConfig, ids: list[str]) -> np.ndarray:
        """(n,) codes of hist feature f for these item ids (models.inputs.ItemCodeLookup)."""
        rows = self.rows
        labels = np.fromiter((rows.get(i, UNSET) for i in ids), dtype=np.int64, count=len(ids))
        memo = self._items.get(f.name)
        if memo is None:
            memo = self._items[f.name] = np.full(self.n_items, UNSET, dtype=np.int64)
        codes = memo[labels]  # label UNSET reads the last slot: overwritten below
        todo = np.flatnonzero((labels == UNSET) | (codes == UNSET))
        if todo.size:
            fresh = self.encoder.encode_item_ids(f, pa.array([ids[i] for i in todo], pa.string()))
            codes[todo] = fresh
            known = labels[todo] != UNSET
            memo[labels[todo][known]] = fresh[known]
        return codes
