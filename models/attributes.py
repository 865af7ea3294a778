"""Which item-table columns `/recall` may filter on, and how each is compared (DESIGN §7, filters).

A model bundle records its filterable columns in its manifest (`filterable: {column: kind}`), chosen at training
(`output.filterable`, default: every attribute column of the catalog) and typed from the Arrow schema, so the index
stage and the service read one contract instead of guessing from whatever a Parquet file holds:

    categorical   strings                 any-of a list of values
    integer       integers                any-of a list of values, or a range (lt / le / gt / ge)
    numeric       floats                  a range
    boolean       booleans                equal to true / false

Bundles written before filters existed record nothing; their catalog is typed the same way when it is read.
"""

from typing import Any, Literal

import pyarrow as pa

from models.errors import QuiverError

Kind = Literal["categorical", "integer", "numeric", "boolean"]
NOT_ATTRIBUTES = ("item_id", "popularity")  # the key, and a training statistic written by Quiver itself


def kind_of(field: pa.Field) -> Kind | None:
    """How a column of this Arrow type is filtered; None for types no filter can compare (lists, structs, ...)."""
    t = field.type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "categorical"
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "numeric"
    return None


def filterable_columns(items: pa.Table, chosen: list[str] | None = None, key: str = "filterable") -> dict[str, Kind]:
    """{column: kind} of the catalog's filterable columns: the `chosen` ones (each must exist and be comparable, or
    the choice is refused naming `key`), or every comparable attribute column when nothing was chosen."""
    if chosen is None:
        kinds = {f.name: kind_of(f) for f in items.schema if f.name not in NOT_ATTRIBUTES}
        return {name: kind for name, kind in kinds.items() if kind is not None}
    out: dict[str, Kind] = {}
    for name in chosen:
        if name in NOT_ATTRIBUTES or name not in items.column_names:
            have = ", ".join(c for c in items.column_names if c not in NOT_ATTRIBUTES) or "none"
            raise QuiverError(f"{key}: {name!r} is not an attribute column of the item table (it has {have})")
        kind = kind_of(items.schema.field(name))
        if kind is None:
            raise QuiverError(
                f"{key}: column {name!r} has type {items.schema.field(name).type}, which no filter compares"
            )
        out[name] = kind
    return out


def recorded_filterable(manifest: dict[str, Any], items: pa.Table) -> dict[str, Kind]:
    """A bundle's filterable columns: as its manifest records them, else (older bundles) every comparable column."""
    recorded = manifest.get("filterable")
    if recorded is None:
        return filterable_columns(items)
    return filterable_columns(items, list(recorded), key=f"model bundle {manifest.get('name')} filterable")
