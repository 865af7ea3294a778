"""`load_data`: read any supported format, split it for evaluation and complete the item catalog."""

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from models.errors import QuiverError
from training.data.config import DataConfig
from training.data.interactions import read_interactions
from training.data.ml1m import read_ml1m
from training.data.readers import data_file, read_negatives
from training.data.recbole import read_recbole
from training.data.schema import RawData, SourceTables
from training.data.sequence_lines import read_sequence_lines
from training.data.split import carve_validation, split_leave_last_out
from training.data.taobao import read_taobao

READERS: dict[str, Callable[[DataConfig], SourceTables]] = {
    "interactions": read_interactions,
    "sequence_lines": read_sequence_lines,
    "ml1m": read_ml1m,
    "recbole": read_recbole,
    "taobao": read_taobao,
}


def load_data(cfg: DataConfig) -> RawData:
    """Read the configured data set and split it.

    leave_last_out: each user's latest event (by time, ties by row order) is test, the second latest validation.
    explicit, or a split the format publishes (ML-1M NCF): test from its file; validation from a valid file, else
    (validation "last") each user's latest training event, ties broken at random by `seed`.
    """
    source = READERS[cfg.format](cfg)
    if source.published_split or cfg.split == "explicit":
        if source.test is None:
            raise QuiverError("data.test: split 'explicit' needs a test file (set data.test)")
        train, valid, test = source.train, source.valid, source.test
        if valid is None and cfg.validation == "last":
            train, valid = carve_validation(train, cfg.seed)
    else:
        train, valid, test = split_leave_last_out(source.train)
    negatives = source.test_negatives
    if negatives is None and cfg.negatives is not None:
        negatives = read_negatives(data_file(cfg, cfg.negatives))
    items = complete_catalog(source.items, [train, valid, test], negatives)
    return RawData(
        train=train,
        valid=valid,
        test=test,
        users=source.users,
        items=items,
        test_negatives=negatives,
        name=source.name,
        split="published" if source.published_split else cfg.split,
    )


def complete_catalog(
    items: pa.Table | None, events: list[pa.Table | None], negatives: dict[str, list[str]] | None
) -> pa.Table:
    """The item table plus a row of nulls for every item that appears in `events` or `negatives` but not in it.

    Added rows follow the item table, in order of first appearance, so the catalog is deterministic.
    """
    seen = [table["item_id"] for table in events if table is not None]
    if negatives:
        seen.append(pa.chunked_array([pa.array([item for ids in negatives.values() for item in ids], pa.string())]))
    appearing = pc.unique(pa.chunked_array([chunk for column in seen for chunk in column.chunks], type=pa.string()))
    if items is None:
        return pa.table({"item_id": appearing})
    missing = appearing.filter(pc.invert(pc.is_in(appearing, value_set=items["item_id"].combine_chunks())))
    if len(missing) == 0:
        return items
    extra = pa.table(
        [missing if field.name == "item_id" else pa.nulls(len(missing), field.type) for field in items.schema],
        schema=items.schema,
    )
    return pa.concat_tables([items, extra]).combine_chunks()
