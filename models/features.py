"""Feature schema and the encoders that turn raw table columns into integer / float arrays.

The same encoder (vocabularies, hash buckets, dense statistics) is saved in the model bundle and reused verbatim at
evaluation and serving time, so an id maps to the same embedding row everywhere.

Index conventions for id-like features: 0 = padding (empty sequence slot, never a real value), 1 = out of
vocabulary (unseen, rare below `min_count`, or null), 2.. = known values in descending training frequency.
"""

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.errors import QuiverError

PAD, OOV = 0, 1
RESERVED = 2  # rows 0 and 1 of every id table
SMALL_LOOKUP = 4096  # up to this many values, an id lookup uses a cached dict instead of Arrow's hash join

FeatureKind = Literal["id", "hash", "multi_id", "dense", "sequence"]


class FeatureConfig(BaseModel):
    """One input feature. `sequence` features are the user's history of item ids."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: FeatureKind
    column: str | None = None  # source column of the user/item table; default: `name`
    embedding_dim: int = Field(default=16, ge=1)
    min_count: int = Field(default=1, ge=1)
    num_buckets: int | None = Field(default=None, ge=1)  # hash
    separator: str = "|"  # multi_id: values in one string cell
    max_len: int = Field(default=8, ge=1)  # multi_id: values kept per cell
    shared_with: str | None = None  # reuse that feature's vocabulary and embedding table

    @property
    def source(self) -> str:
        return self.column or self.name

    @model_validator(mode="after")
    def _kind_options(self) -> Self:
        if self.kind == "hash" and self.num_buckets is None:
            raise ValueError(f"feature {self.name}: kind 'hash' needs num_buckets")
        if self.kind != "hash" and self.num_buckets is not None:
            raise ValueError(f"feature {self.name}: num_buckets is only for kind 'hash'")
        return self


class FeatureGroups(BaseModel):
    """The `features:` section: which features feed the user tower, the item tower and the history."""

    model_config = ConfigDict(extra="forbid")

    user: list[FeatureConfig] = Field(default_factory=list)
    item: list[FeatureConfig] = Field(min_length=1)
    hist: list[FeatureConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        names = [f.name for f in self.all()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"feature names must be unique, repeated: {dupes}")
        by_name = {f.name: f for f in self.all()}
        for group, feats in (("user", self.user), ("item", self.item)):
            for f in feats:
                if f.kind == "sequence":
                    raise ValueError(f"features.{group}.{f.name}: sequence features belong in features.hist")
        for f in self.hist:
            if f.kind != "sequence":
                raise ValueError(f"features.hist.{f.name}: only kind 'sequence' goes in features.hist")
        if not self.user and not self.hist:
            raise ValueError("features: the user tower needs at least one user or hist feature")
        for f in self.all():
            if f.shared_with is None:
                continue
            if f.kind not in ("id", "multi_id", "sequence"):
                raise ValueError(f"features.{f.name}.shared_with: a {f.kind} feature has no table to share")
            other = by_name.get(f.shared_with)
            if other is None or other.kind not in ("id", "hash") or other.shared_with is not None:
                raise ValueError(f"features.{f.name}.shared_with: '{f.shared_with}' is not an id feature")
            if other.embedding_dim != f.embedding_dim:
                raise ValueError(f"features.{f.name}.embedding_dim must equal that of '{f.shared_with}'")
        return self

    def all(self) -> list[FeatureConfig]:
        return [*self.user, *self.item, *self.hist]

    def group(self, name: str) -> list[FeatureConfig]:
        return {"user": self.user, "item": self.item, "hist": self.hist}[name]


def _small_lookup(values: pa.Array | pa.ChunkedArray, code: Callable[[str], int]) -> np.ndarray:
    """(n,) int64 codes of a request-sized input, value by value as strings; nulls map to OOV."""
    strings = values.cast(pa.string()).to_pylist()
    return np.fromiter((OOV if v is None else code(v) for v in strings), dtype=np.int64, count=len(strings))


@dataclass
class Vocab:
    """Frequency-ordered vocabulary: tokens[i] has index i + 2."""

    tokens: list[str]
    _index: dict[str, int] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def build(cls, values: pa.Array | pa.ChunkedArray, min_count: int = 1) -> Self:
        counts = pc.value_counts(pc.drop_null(values.cast(pa.string())))
        tokens = counts.field("values").to_pylist()
        freq = counts.field("counts").to_numpy()
        order = sorted(range(len(tokens)), key=lambda i: (-freq[i], tokens[i]))  # ties by token: deterministic
        return cls([tokens[i] for i in order if freq[i] >= min_count])

    def __len__(self) -> int:
        return len(self.tokens) + RESERVED

    def lookup(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """(n,) int64; null or unknown values map to OOV.

        A column goes through Arrow's hash join, which hashes the whole vocabulary on every call; a handful of
        values (one serving request: a profile, a history) goes through a dict built once, since hashing a
        million-item vocabulary per request would cost more than the request itself."""
        if len(values) <= SMALL_LOOKUP:
            codes = self._codes()
            return _small_lookup(values, lambda v: codes.get(v, OOV))
        pos = pc.index_in(values.cast(pa.string()), value_set=pa.array(self.tokens, pa.string()))
        return pc.fill_null(pc.add(pos, RESERVED), OOV).to_numpy(zero_copy_only=False).astype(np.int64)

    def _codes(self) -> dict[str, int]:
        if self._index is None:
            self._index = {t: i + RESERVED for i, t in enumerate(self.tokens)}
        return self._index

    def to_json(self) -> str:
        return json.dumps({"kind": "vocab", "tokens": self.tokens}, ensure_ascii=False)


@functools.lru_cache(maxsize=1 << 18)
def stable_hash(value: str) -> int:
    """64 bits of blake2b. Cached: the service hashes every history item of every request, and histories repeat the
    popular items (a cache hit costs a tenth of the ~0.5 µs hash)."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little")


@dataclass
class HashBuckets:
    """Ids hashed into a fixed number of buckets: for vocabularies too large to store. The hash is stable
    across processes and machines (blake2b, not Python's salted `hash`)."""

    num_buckets: int

    def __len__(self) -> int:
        return self.num_buckets + RESERVED

    def lookup(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """(n,) int64; nulls map to OOV.

        A column is dictionary-encoded first, so each distinct id is hashed once; a handful of values (one serving
        request's history) is hashed value by value through the cache, since the encoding's fixed cost (~10 µs a
        call) is more than hashing them."""
        if len(values) <= SMALL_LOOKUP:
            n = self.num_buckets
            return _small_lookup(values, lambda v: stable_hash(v) % n + RESERVED)
        encoded = pc.dictionary_encode(values.cast(pa.string()))
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        uniques = encoded.dictionary.to_pylist()
        buckets = np.array([stable_hash(u) % self.num_buckets for u in uniques], dtype=np.int64)
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        out = np.full(len(values), OOV, dtype=np.int64)
        valid = encoded.indices.is_valid().to_numpy(zero_copy_only=False)
        out[valid] = buckets[codes[valid].astype(np.int64)] + RESERVED
        return out

    def to_json(self) -> str:
        return json.dumps({"kind": "hash", "num_buckets": self.num_buckets})


@dataclass
class DenseStats:
    """Standardisation statistics, fitted on the training tables."""

    mean: float
    std: float

    @classmethod
    def fit(cls, values: pa.Array | pa.ChunkedArray) -> Self:
        x = pc.drop_null(values.cast(pa.float64())).to_numpy(zero_copy_only=False)
        if len(x) == 0:
            return cls(0.0, 1.0)
        std = float(x.std())
        return cls(float(x.mean()), std if std > 0 else 1.0)

    def transform(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """(n,) float32; nulls become the mean, i.e. 0 after standardising."""
        x = pc.fill_null(values.cast(pa.float64()), self.mean).to_numpy(zero_copy_only=False)
        return ((x - self.mean) / self.std).astype(np.float32)

    def to_json(self) -> str:
        return json.dumps({"kind": "dense", "mean": self.mean, "std": self.std})


Encoding = Vocab | HashBuckets | DenseStats


def encoding_from_json(text: str) -> Encoding:
    data = json.loads(text)
    kind = data.get("kind")
    if kind == "vocab":
        return Vocab([str(t) for t in data["tokens"]])
    if kind == "hash":
        return HashBuckets(int(data["num_buckets"]))
    if kind == "dense":
        return DenseStats(float(data["mean"]), float(data["std"]))
    raise QuiverError(f"unknown encoding kind {kind!r} in a saved vocabulary")


def split_multi(values: pa.Array | pa.ChunkedArray, separator: str, max_len: int) -> tuple[pa.Array, np.ndarray]:
    """Split 'a|b|c' cells into a flat array of values plus each cell's count (capped at max_len).

    Null cells and empty parts ('' or 'a||b') contribute no value, so they encode as padding, never as a token."""
    lists = pc.split_pattern(values.cast(pa.string()), pattern=separator)
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    flat = pc.list_flatten(lists)
    parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    flat, parent = flat.filter(pa.array(keep)), parent[keep]
    # Position of each kept value within its cell: drop those beyond max_len.
    starts = np.searchsorted(parent, parent, side="left")
    rank = np.arange(len(parent)) - starts
    within = rank < max_len
    lengths = np.bincount(parent[within], minlength=len(values)).astype(np.int64)
    return flat.filter(pa.array(within)), lengths


def pad_ragged(flat_codes: np.ndarray, lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Ragged codes + lengths -> (n, max_len) int64, zero-padded at the end."""
    out = np.zeros((len(lengths), max_len), dtype=np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    cols = np.arange(len(flat_codes)) - np.repeat(starts, lengths)
    out[rows, cols] = flat_codes
    return out


class FeatureEncoder:
    """Maps table columns to model inputs with encodings fitted once on training data."""

    def __init__(self, groups: FeatureGroups, encodings: dict[str, Encoding]) -> None:
        self.groups = groups
        self.encodings = encodings

    @classmethod
    def fit(
        cls,
        groups: FeatureGroups,
        train: pa.Table,
        users: pa.Table | None,
        items: pa.Table,
    ) -> Self:
        """Vocabularies of `user_id`/`item_id`-sourced features count training interactions; other columns count
        rows of their side table (a profile value is as frequent as the users who have it)."""
        encodings: dict[str, Encoding] = {}
        for group in ("user", "item", "hist"):
            table = users if group == "user" else items
            for f in groups.group(group):
                if f.shared_with is not None:
                    continue
                if f.kind == "hash":
                    encodings[f.name] = HashBuckets(f.num_buckets or 1)
                    continue
                if f.kind == "sequence" or f.source in ("user_id", "item_id"):
                    column = train["item_id" if f.kind == "sequence" else f.source]
                else:
                    column = _column(table, f, group)
                if f.kind == "dense":
                    encodings[f.name] = DenseStats.fit(column)
                elif f.kind == "multi_id":
                    encodings[f.name] = Vocab.build(split_multi(column, f.separator, f.max_len)[0], f.min_count)
                else:
                    encodings[f.name] = Vocab.build(column, f.min_count)
        return cls(groups, encodings)

    def encoding(self, f: FeatureConfig) -> Encoding:
        return self.encodings[f.shared_with or f.name]

    def table_sizes(self) -> dict[str, int]:
        """Rows of each embedding table (features that own one)."""
        return {name: len(enc) for name, enc in self.encodings.items() if not isinstance(enc, DenseStats)}

    def encode_table(
        self, group: Literal["user", "item"], table: pa.Table | None, n_rows: int
    ) -> dict[str, np.ndarray]:
        """Encode every feature of the group for each row of `table`: id (n,), multi_id (n, max_len), dense (n,)."""
        out: dict[str, np.ndarray] = {}
        for f in self.groups.group(group):
            column = _column(table, f, group)
            enc = self.encoding(f)
            if f.kind == "multi_id":
                flat, lengths = split_multi(column, f.separator, f.max_len)
                assert not isinstance(enc, DenseStats)
                out[f.name] = pad_ragged(enc.lookup(flat), lengths, f.max_len)
            elif isinstance(enc, DenseStats):
                out[f.name] = enc.transform(column)
            else:
                out[f.name] = enc.lookup(column)
            if len(out[f.name]) != n_rows:
                raise QuiverError(f"features.{group}.{f.name}: {len(out[f.name])} values for {n_rows} rows")
        return out

    def encode_item_ids(self, f: FeatureConfig, item_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Item ids -> codes of a sequence feature (the history shares the item-id vocabulary)."""
        enc = self.encoding(f)
        assert not isinstance(enc, DenseStats)
        return enc.lookup(item_ids)

    def to_files(self) -> dict[str, str]:
        return {f"vocab/{name}.json": enc.to_json() for name, enc in sorted(self.encodings.items())}

    @classmethod
    def from_files(cls, groups: FeatureGroups, files: dict[str, str]) -> Self:
        encodings: dict[str, Encoding] = {}
        for f in groups.all():
            if f.shared_with is not None:
                continue
            key = f"vocab/{f.name}.json"
            if key not in files:
                raise QuiverError(f"bundle is missing {key}")
            encodings[f.name] = encoding_from_json(files[key])
        return cls(groups, encodings)


def _column(table: pa.Table | None, f: FeatureConfig, group: str) -> pa.ChunkedArray:
    if table is None or f.source not in table.column_names:
        where = "no table" if table is None else f"columns {table.column_names}"
        raise QuiverError(f"features.{group}.{f.name}: column '{f.source}' not found ({where})")
    return table[f.source]
