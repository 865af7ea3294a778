"""The lookups behind the debug views (GET /items/{id}, GET /users/{id}): what the served triple and the user
state store hold, so an operator can see why a user got what they got.

Read-only by design: a user view reads Redis with the same one-round-trip `fetch` a /recall makes (never a write,
never a TTL refresh) and resolves it with the same `userstate.resolve`, so it shows exactly the state the next
/recall of that user would be served from. It does not go through `pipeline.user_state`, so looking at a user does
not count as a recall in the stage timings or in `quiver_degraded_total`.
"""

import math
from collections.abc import Mapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from service.runtime import Runtime
from service.schemas import ItemView, UserView
from service.userstate import HISTORY_TIME_MISSING, RedisStore, resolve


def json_safe(value: Any) -> Any:
    """A catalog or profile value as plain JSON: Parquet cells may be NaN, dates, decimals or bytes, which JSON (and
    the OpenAPI document's `number`) cannot carry as they are."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, Decimal):
        return json_safe(float(value))
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray):
        return value.hex()
    return str(value)


def catalog_row(items: pa.Table, item_id: str) -> dict[str, Any] | None:
    """The catalog's row of `item_id`, or None. A vectorised scan rather than an id -> row dict: this view is rare, and
    a dict over a million-item catalog would hold ~100 MB for the life of the triple. Ids compare as strings, as the
    runtime reads them (an integer id column matches "42")."""
    col = items.column("item_id")
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = pc.cast(col, pa.string())
    row = pc.index(col, pa.scalar(item_id, col.type)).as_py()
    if row is None or row < 0:
        return None
    return items.slice(row, 1).to_pylist()[0]


def served(rt: Runtime) -> dict[str, str | None]:
    """The versions every view names, so an operator knows which triple answered."""
    return dict(zip(("model_version", "index_version", "ranker_version"), rt.versions, strict=True))


def item_view(rt: Runtime, item_id: str) -> ItemView | None:
    """None when neither the index nor the catalog knows the item. An item upserted into the index after training
    (`quiver-index add`) is in the index only: it is served, so it is found, with no catalog attributes."""
    row = catalog_row(rt.model.items, item_id)
    label = rt.rows.get(item_id)
    if row is None and label is None:
        return None
    attributes = popularity = None
    if row is not None:
        pop = row.pop("popularity", None)
        popularity = float(pop) if pop is not None and math.isfinite(float(pop)) else None
        row.pop("item_id", None)
        attributes = {str(k): json_safe(v) for k, v in row.items()}
    filter_attributes = None
    if label is not None:
        filter_attributes = {k: json_safe(v) for k, v in rt.attributes.row(label).items()}
    return ItemView.model_construct(
        **served(rt),
        item_id=item_id,
        in_catalog=row is not None,
        attributes=attributes,
        popularity=popularity,
        in_index=label is not None,
        index_label=label,
        filter_attributes=filter_attributes,
        in_ranker=item_id in rt.ranker.item_row if rt.ranker is not None else None,
    )


async def user_view(rt: Runtime, store: RedisStore | None, user_id: str) -> UserView | None:
    """The state a /recall without `history` or `features` would read now; None for a user no source knows.

    With Redis unavailable, a user the bundle lacks cannot be told apart from one only Redis knows, so they are not
    reported unknown: the view answers what /recall serves them meanwhile (the popularity fallback, flagged)."""
    record = await store.fetch(user_id, rt.state_len) if store is not None else None
    redis = "not_configured" if store is None else "ok" if record is not None else "unavailable"
    state = resolve(user_id, rt.users, record, store is not None, None, None)
    if state.popularity_only and redis != "unavailable":
        return None
    start = max(0, len(state.history) - rt.state_len)  # the latest items, as the stages cut them
    history = state.history[start:]
    times = state.history_time  # kept only when they line up with the history item for item
    times = times[start:] if times is not None and len(times) == len(state.history) else None
    degraded = list(state.degraded)
    if rt.reads_time and history and times is None:  # as pipeline.user_state flags it for the tower
        degraded.append(HISTORY_TIME_MISSING)
    unknown = rt.split_known(history)[1]
    profile = {k: json_safe(v) for k, v in state.profile.items() if k != "user_id"}
    return UserView.model_construct(
        **served(rt),
        user_id=user_id,
        source=state.source,
        history=history,
        history_timestamps=times,
        tower_history_length=rt.history_len,
        unknown_items=unknown or None,
        profile=profile,
        redis=redis,
        degraded=",".join(degraded) or None,
    )
