"""The canonical in-memory form of a data set, whatever file format it came from.

Every reader produces these tables so that the feature layer, trainer and evaluator never see a file format. Ids are
always strings here: files disagree on whether ids are ints, and the feature layer builds its own vocabularies.
"""

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

# The schema of train/valid/test: one row per positive event.
INTERACTION_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string()),
        pa.field("item_id", pa.string()),
        pa.field("timestamp", pa.int64()),
        pa.field("weight", pa.float32()),
    ]
)


@dataclass
class RawData:
    """A loaded data set, already split for offline evaluation."""

    train: pa.Table  # INTERACTION_SCHEMA, one row per event
    valid: pa.Table | None  # same schema
    test: pa.Table | None  # same schema
    users: pa.Table | None  # user_id: string + profile columns
    items: pa.Table  # item_id: string + attributes; the catalog: every item seen anywhere has a row (nulls if unknown)
    test_negatives: dict[str, list[str]] | None  # user_id -> sampled-protocol negatives (e.g. 99)
    name: str
    split: str = "leave_last_out"  # how test was chosen: leave_last_out | explicit | published (the format's own)


@dataclass
class SourceTables:
    """What a format reader hands to `load_data`, before the split and the catalog completion.

    `test`/`valid` are set only when the files themselves carry them (an explicit test file, the NCF split);
    `published_split` marks a split that the format defines (ML-1M NCF files), which applies whatever `data.split` says.
    """

    train: pa.Table
    users: pa.Table | None
    items: pa.Table | None
    name: str
    test: pa.Table | None = None
    valid: pa.Table | None = None
    test_negatives: dict[str, list[str]] | None = None
    published_split: bool = False


def interactions_table(
    user_id: pa.Array | pa.ChunkedArray,
    item_id: pa.Array | pa.ChunkedArray,
    timestamp: pa.Array | pa.ChunkedArray,
    weight: pa.Array | pa.ChunkedArray | None = None,
) -> pa.Table:
    """Build a table with exactly INTERACTION_SCHEMA, casting ids to string and defaulting weights to 1."""
    n = len(user_id)
    if weight is None:
        weight = pa.array(np.ones(n, dtype=np.float32))
    return pa.Table.from_arrays(
        [
            user_id.cast(pa.string()),
            item_id.cast(pa.string()),
            timestamp.cast(pa.int64()),
            weight.cast(pa.float32()),
        ],
        schema=INTERACTION_SCHEMA,
    )
