"""Raw tables -> aligned integer arrays the trainer and evaluator index into.

Everything is an array over one of three axes: users (U), catalog items (I) and events (n). A batch is a gather of
rows, so assembling it costs a few numpy fancy-indexing calls, not a Python loop per sample.
"""

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from models.errors import QuiverError
from models.features import FeatureEncoder
from models.sequence import HIST_TIME
from training.data.config import DataConfig
from training.data.history import OtherEvents, build_histories
from training.data.schema import RawData
from training.ranking import Csr

LATEST = np.iinfo(np.int64).max  # timestamp of a "now" query: sees every event of the user


@dataclass
class Events:
    """One row per event: who, which catalog row, how much it counts, what the user had seen before."""

    user_row: np.ndarray  # (n,) int64
    item_row: np.ndarray  # (n,) int64
    weight: np.ndarray  # (n,) float32
    hist: np.ndarray | None  # (n, L) int64: catalog row + 1 of earlier items, oldest first, 0 = padding
    others: OtherEvents | None = None  # instead of `hist` with data.history "others": drawn per step
    time: np.ndarray | None = None  # (n,) int64 timestamps: the order of the sequence models' training rows

    def histories(self, idx: np.ndarray) -> np.ndarray:
        """(B, L) history of the events idx."""
        if self.others is not None:
            return self.others.sample(idx)
        assert self.hist is not None
        return self.hist[idx]


@dataclass
class Queries:
    """One row per evaluated user: their history at query time and their held-out items."""

    user_row: np.ndarray  # (Q,) int64
    hist: np.ndarray  # (Q, L) int64, as Events.hist
    truth: Csr  # Q rows of catalog rows
    exclude: Csr  # Q rows: items already interacted with, never recommended again
    negatives: np.ndarray | None = None  # (Q, M) catalog rows of the sampled protocol
    hist_time: np.ndarray | None = None  # (Q, L) timestamps aligned with hist, for models that read them


@dataclass
class EncodedData:
    encoder: FeatureEncoder
    user_ids: pa.Array  # (U,)
    users: pa.Table  # (U rows) user_id + profile columns, the table user features were encoded from
    items: pa.Table  # (I rows) the catalog
    user_feats: dict[str, np.ndarray]  # each (U, ...)
    item_feats: dict[str, np.ndarray]  # each (I, ...)
    seq_codes: dict[str, np.ndarray]  # each (I + 1,): catalog row + 1 -> code of that sequence feature
    popularity: np.ndarray  # (I,) float32 training event count
    train: Events
    valid: Queries | None
    test: Queries | None
    recent: np.ndarray  # (U, L) catalog row + 1 of each user's latest items over every split: the serving state
    recent_time: np.ndarray | None = None  # (U, L) their timestamps, for models that read them

    @property
    def n_items(self) -> int:
        return len(self.items)

    def recent_items(self) -> list[list[str]]:
        """Each user's latest items as item ids, oldest first."""
        ids = np.asarray(self.items["item_id"].to_pylist(), dtype=object)
        return [[str(x) for x in ids[row[row > 0] - 1]] for row in self.recent]

    def recent_times(self) -> list[list[int]] | None:
        """The timestamps of recent_items(), where the encoding kept them."""
        if self.recent_time is None:
            return None
        return [times[row > 0].tolist() for row, times in zip(self.recent, self.recent_time, strict=True)]

    def user_batch(
        self, user_row: np.ndarray, hist: np.ndarray, device: torch.device, hist_time: np.ndarray | None = None
    ) -> dict[str, torch.Tensor]:
        """hist_time (B, L): the history's timestamps, for a model that reads them (HSTU's time buckets)."""
        batch = {name: _tensor(values[user_row], device) for name, values in self.user_feats.items()}
        for name, codes in self.seq_codes.items():
            batch[name] = _tensor(codes[hist], device)  # (B, L)
        if hist_time is not None:
            batch[HIST_TIME] = _tensor(hist_time, device)  # (B, L)
        return batch

    def item_batch(self, item_row: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        return {name: _tensor(values[item_row], device) for name, values in self.item_feats.items()}


def _tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(device, non_blocking=True)


def user_universe(raw: RawData) -> pa.Table:
    """Every user of the profile table, then every user seen only in events; profile columns null for those."""
    ids = [raw.users["user_id"]] if raw.users is not None else []
    ids += [t["user_id"] for t in (raw.train, raw.valid, raw.test) if t is not None]
    chunks = [c for column in ids for c in column.chunks]
    # pc.unique keeps first-seen order, so the profile table's order comes first.
    universe = pc.unique(pa.chunked_array(chunks, type=pa.string()))
    table = pa.table({"user_id": universe})
    if raw.users is None:
        return table
    pos = pc.index_in(universe, value_set=raw.users["user_id"].combine_chunks())
    columns = {"user_id": universe}
    for name in raw.users.column_names:
        if name != "user_id":
            columns[name] = pc.take(raw.users[name], pos)
    return pa.table(columns)


def rows_of(values: pa.ChunkedArray | pa.Array, index: pa.Array, what: str) -> np.ndarray:
    pos = pc.index_in(values, value_set=index)
    if pos.null_count:
        raise QuiverError(f"{pos.null_count} {what} ids are missing from the {what} table")
    return pos.to_numpy(zero_copy_only=False).astype(np.int64)


def encode(
    raw: RawData,
    encoder: FeatureEncoder,
    data: DataConfig,
    valid_users: int | None = None,
    event_histories: bool = True,
    history_times: bool = False,
) -> EncodedData:
    """event_histories False: no per-event history matrix (sequence models train on whole sequences instead).
    history_times: the queries also carry their histories' timestamps (`Queries.hist_time`)."""
    users = user_universe(raw)
    user_index = users["user_id"].combine_chunks()
    item_index = raw.items["item_id"].combine_chunks()
    n_users, n_items = len(users), len(raw.items)
    shuffle = data.history == "others"
    query_len = data.query_seq_len or data.max_seq_len

    def rows(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u = rows_of(table["user_id"], user_index, "user")
        i = rows_of(table["item_id"], item_index, "item")
        return u, i, table["timestamp"].to_numpy().astype(np.int64)

    tu, ti, tt = rows(raw.train)
    if len(tu) == 0:
        raise QuiverError("the training split is empty")
    weight = raw.train["weight"].to_numpy().astype(np.float32)
    if not event_histories:
        train = Events(tu, ti, weight, None, time=tt)
    elif shuffle:
        train = Events(tu, ti, weight, None, OtherEvents(tu, ti + 1, data.max_seq_len, data.seed), time=tt)
    else:
        train = Events(tu, ti, weight, build_histories(tu, tt, ti + 1, data.max_seq_len)[0], time=tt)
    popularity = np.bincount(ti, minlength=n_items).astype(np.float32)

    seq_codes = {}
    for f in encoder.groups.hist:
        codes = encoder.encode_item_ids(f, raw.items["item_id"])
        seq_codes[f.name] = np.concatenate([[0], codes]).astype(np.int64)

    # Each split's rows are looked up once: id -> row mapping is the costly part (a hash lookup per event).
    held = {name: rows(t) for name, t in (("valid", raw.valid), ("test", raw.test)) if t is not None and t.num_rows}
    every = [(tu, ti, tt), *held.values()]
    all_u, all_i, all_t = (np.concatenate([r[k] for r in every]) for k in range(3))

    valid = test = None
    if "valid" in held:
        vu, vi, _ = held["valid"]
        valid = make_queries((tu, tt, ti), (vu, vi), n_users, query_len, shuffle, valid_users, history_times)
    if "test" in held:
        su, si, _ = held["test"]
        seen = (tu, tt, ti)
        if "valid" in held:
            vu, vi, vt = held["valid"]
            seen = (np.concatenate([tu, vu]), np.concatenate([tt, vt]), np.concatenate([ti, vi]))
        test = make_queries(seen, (su, si), n_users, query_len, shuffle, times=history_times)
        if raw.test_negatives:
            test.negatives = negatives_for(raw, test.user_row, user_index, item_index)
            if valid is not None:
                # Validation follows the test protocol: as many negatives, drawn as the NCF files were (uniform over
                # the items the user never interacted with), so the best epoch is picked on the metric reported.
                valid.negatives = uniform_negatives(
                    all_u, all_i, valid.user_row, n_items, test.negatives.shape[1], data.seed
                )
    return EncodedData(
        encoder=encoder,
        recent=history_now((all_u, all_t, all_i), np.arange(n_users), query_len, shuffle),
        recent_time=(
            history_now((all_u, all_t, all_i), np.arange(n_users), query_len, shuffle, values=all_t)
            if history_times
            else None
        ),
        user_ids=user_index,
        users=users,
        items=raw.items,
        user_feats=encoder.encode_table("user", users, n_users),
        item_feats=encoder.encode_table("item", raw.items, n_items),
        seq_codes=seq_codes,
        popularity=popularity,
        train=train,
        valid=valid,
        test=test,
    )


def subsample(q: Queries, limit: int | None, seed: int = 0) -> Queries:
    """At most `limit` query users (seeded, order kept)."""
    if limit is None or len(q.user_row) <= limit:
        return q
    keep = np.sort(np.random.default_rng(seed).choice(len(q.user_row), limit, replace=False))
    times = q.hist_time[keep] if q.hist_time is not None else None
    return Queries(q.user_row[keep], q.hist[keep], q.truth.take(keep), q.exclude.take(keep), hist_time=times)


def history_now(
    seen: tuple[np.ndarray, np.ndarray, np.ndarray],
    query_users: np.ndarray,
    length: int,
    shuffle: bool,
    values: np.ndarray | None = None,
) -> np.ndarray:
    """(Q, length) catalog row + 1 of each query user's latest `length` seen items, oldest first, 0-padded; with
    `values` (n,), those events' values instead (their timestamps, say), laid out alike.

    Same ordering as build_histories (by time, equal times by row), computed for the query users only: memory is
    (Q, length), not (events, length). shuffle: the events have no order (data.history "others"), so a seeded random
    `length` of them is taken instead: random ranks stand in for the timestamps.
    """
    su, st, si = seen
    if shuffle:
        st = np.random.default_rng(0).permutation(len(su)).astype(np.int64)
    order = np.lexsort((st, su))  # (n,) by user, then time, then row
    items = si[order] + 1 if values is None else values[order]
    n_users = int(max(su.max(initial=-1), query_users.max(initial=-1))) + 1
    counts = np.bincount(su, minlength=n_users)
    ends = np.cumsum(counts)[query_users]  # (Q,)
    starts = np.maximum(ends - counts[query_users], ends - length)  # the last `length` events of each user
    idx = starts[:, None] + np.arange(length)[None, :]  # (Q, length)
    valid = idx < ends[:, None]
    return np.where(valid, items[np.where(valid, idx, 0)] if len(items) else 0, 0)


def make_queries(
    seen: tuple[np.ndarray, np.ndarray, np.ndarray],
    held_out: tuple[np.ndarray, np.ndarray],
    n_users: int,
    length: int,
    shuffle: bool = False,
    limit: int | None = None,
    times: bool = False,
) -> Queries:
    """One query per user with held-out items: history = their seen items (history_now), truth = all held-out items;
    times: also the history's timestamps."""
    su, _, si = seen
    hu, hi = held_out
    query_users = np.unique(hu)  # (Q,)
    if limit is not None and len(query_users) > limit:
        query_users = np.sort(np.random.default_rng(0).choice(query_users, limit, replace=False))
    hist = history_now(seen, query_users, length, shuffle)
    q_of_user = np.full(n_users, -1, dtype=np.int64)
    q_of_user[query_users] = np.arange(len(query_users))
    keep = q_of_user[hu] >= 0
    truth = Csr.from_pairs(q_of_user[hu[keep]], hi[keep], len(query_users))
    seen_keep = q_of_user[su] >= 0
    exclude = Csr.from_pairs(q_of_user[su[seen_keep]], si[seen_keep], len(query_users))
    hist_time = history_now(seen, query_users, length, shuffle, values=seen[1]) if times else None
    return Queries(query_users, hist, truth, exclude, hist_time=hist_time)


def uniform_negatives(
    users: np.ndarray, items: np.ndarray, query_users: np.ndarray, n_items: int, m: int, seed: int
) -> np.ndarray:
    """(Q, m) distinct catalog rows per query user, uniform over the items that user never interacted with."""
    rng = np.random.default_rng(seed)
    order = np.argsort(users, kind="stable")
    counts = np.bincount(users, minlength=int(query_users.max(initial=0)) + 1)
    ends = np.cumsum(counts)
    out = np.empty((len(query_users), m), dtype=np.int64)
    for q, u in enumerate(query_users):
        known = items[order[ends[u] - counts[u] : ends[u]]]
        if n_items - len(np.unique(known)) < m:
            raise QuiverError(f"user row {u}: fewer than {m} items left to draw validation negatives from")
        pool = np.setdiff1d(rng.choice(n_items, min(n_items, 2 * m + len(known)), replace=False), known)
        while len(pool) < m:  # rare: the user knows most of the catalog
            pool = np.union1d(pool, np.setdiff1d(rng.choice(n_items, m, replace=False), known))
        out[q] = rng.permutation(pool)[:m]
    return out


def negatives_for(raw: RawData, query_users: np.ndarray, user_index: pa.Array, item_index: pa.Array) -> np.ndarray:
    """(Q, M) catalog rows of each query user's sampled-protocol negatives."""
    assert raw.test_negatives is not None
    ids = pc.take(user_index, pa.array(query_users)).to_pylist()
    missing = [u for u in ids if u not in raw.test_negatives]
    if missing:
        raise QuiverError(f"negatives file has no row for user {missing[0]!r} ({len(missing)} test users missing)")
    lists = [raw.test_negatives[u] for u in ids]
    m = len(lists[0])
    if any(len(x) != m for x in lists):
        raise QuiverError("negatives file: every user must have the same number of negatives")
    flat = pa.array([i for x in lists for i in x], pa.string())
    return rows_of(flat, item_index, "item").reshape(len(ids), m)
