"""Request and response bodies of the HTTP API (DESIGN §7).

Requests are strict: an unknown field is a 422 naming it (a misspelt `exclude_seen` should not silently do
nothing), and values are not coerced (`"k": "10"` or `"k": true` is a 422, not 10 or 1). Histories are item ids
oldest first, the order the clicks happened.

Responses are built by the routes with `model_construct` (their content comes from the service itself, so a second
validation pass would only cost time) and serialised by pydantic; scored items are TypedDicts, plain dicts that
still appear by name in the OpenAPI document.
"""

from collections import Counter
from typing import Annotated, Any, Literal, NotRequired, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator
from typing_extensions import TypedDict  # pydantic reads typing's TypedDict only on Python >= 3.12

Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Timestamp = Annotated[int, Field(ge=0, strict=True)]  # integer seconds, the clock of the training data
FeatureValue = str | int | float | bool | None
MAX_K = 1000
MAX_CANDIDATES = 1000
MAX_LIST = 10_000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class UserInput(Strict):
    user_id: Id
    history: list[Id] | None = Field(
        None, max_length=MAX_LIST, description="item ids, oldest first; replaces the stored history for this request"
    )
    history_timestamps: list[Timestamp] | None = Field(
        None,
        max_length=MAX_LIST,
        description="when each `history` item was clicked (seconds), for models that read the times (HSTU with "
        "time buckets); one per history item",
    )
    features: dict[Id, FeatureValue] | None = Field(
        None,
        max_length=256,
        description="profile fields that override the stored profile for this request; keys the served bundles do "
        "not read are ignored and listed in the answer's `ignored_features`",
    )

    @model_validator(mode="after")
    def _times_match_history(self) -> Self:
        if self.history_timestamps is not None and len(self.history_timestamps) != len(self.history or []):
            raise ValueError(
                f"history_timestamps: {len(self.history_timestamps)} timestamps for {len(self.history or [])} "
                "history items; send one per item, or none"
            )
        return self


class FilterRange(Strict):
    lt: float | None = None
    le: float | None = None
    gt: float | None = None
    ge: float | None = None


FilterValue = Annotated[
    Annotated[list[str | int | float], Field(min_length=1, max_length=MAX_LIST)] | FilterRange | bool,
    Field(
        description="a list of values (categorical and integer columns: any of them passes), a range {lt, le, gt, "
        "ge} (integer and numeric columns), or true / false (boolean columns)"
    ),
]


class RecallRequest(UserInput):
    k: int = Field(100, ge=1, le=MAX_K)
    model: Id | None = Field(None, description="retriever bundle name; must be the loaded one (default: it)")
    exclude_seen: bool = Field(True, description="leave out the items of the user's history")
    exclude: list[Id] = Field(default_factory=list, max_length=MAX_LIST)
    rerank: bool = Field(False, description="reorder the retrieved candidates by the TDM ranker")
    filter: dict[Id, FilterValue] | None = Field(
        None,
        max_length=64,
        description="item attributes every answered item must have, applied inside the search (every clause must "
        "hold; a null attribute never passes): exactly k items come back whenever k pass. Columns: the served "
        "index's filterable ones (GET /models); an unknown column or a value of the wrong type is a 422",
    )


class RankRequest(UserInput):
    candidates: list[Id] = Field(
        min_length=1, max_length=MAX_CANDIDATES, description="distinct item ids to order (a repeated id is a 422)"
    )
    k: int | None = Field(None, ge=1, le=MAX_CANDIDATES, description="return the best k (default: all)")

    @field_validator("candidates")
    @classmethod
    def _distinct(cls, candidates: list[str]) -> list[str]:
        repeated = [c for c, n in Counter(candidates).items() if n > 1]
        if repeated:
            shown = ", ".join(repr(c) for c in repeated[:10])
            raise ValueError(f"repeated item ids ({shown}); send each candidate once")
        return candidates


class EventsRequest(Strict):
    user_id: Id
    event_id: Id | None = Field(
        None,
        description="idempotency key of this batch of clicks: a retry with the same id (after a 503 or a timeout) "
        "stores nothing twice. Ids are remembered per user for a bounded window (QUIVER_EVENT_ID_WINDOW_S)",
    )
    items: list[Id] = Field(min_length=1, max_length=1000, description="clicked item ids, oldest first")
    timestamps: list[Timestamp] | None = Field(
        None, max_length=1000, description="when each click happened (seconds; default: when it arrives)"
    )

    @model_validator(mode="after")
    def _times_match_items(self) -> Self:
        if self.timestamps is not None and len(self.timestamps) != len(self.items):
            raise ValueError(f"timestamps: {len(self.timestamps)} timestamps for {len(self.items)} items")
        return self


class ScoredItem(TypedDict):
    item_id: str
    score: float
    interest: NotRequired[Annotated[int, Field(description="which interest vector found it (0 for one-vector models)")]]
    retrieval_score: NotRequired[Annotated[float, Field(description="the index score, when `score` is the ranker's")]]


class Answer(BaseModel):
    model_version: str
    index_version: str
    ranker_version: str | None = None
    user_state: str = Field(description="where the history came from: request, redis, bundle or none")
    degraded: str | None = Field(None, description="why the answer is not fully personalised, when it is not")
    unknown_items: dict[str, list[str]] | None = Field(
        None, description="per request field, item ids not in the served catalog (reported, never scored)"
    )
    ignored_features: list[str] | None = Field(
        None, description="`features` keys that no served bundle reads (accepted, not used)"
    )


class RecallResponse(Answer):
    items: list[ScoredItem]
    filter_matches: int | None = Field(
        None, description="with a filter: how many served items pass it (0: none does, and `items` is empty)"
    )


class RankResponse(Answer):
    items: list[ScoredItem]


class EventsResponse(BaseModel):
    user_id: str
    history_length: int
    unknown_items: list[str] = Field(default_factory=list)
    duplicate: bool = Field(False, description="the event_id was seen before: nothing was appended this time")


class Refusal(BaseModel):
    reason: str
    at: float = Field(description="when (Unix seconds)")
    versions: tuple[str, str, str | None] | None = Field(None, description="the refused model, index, ranker versions")


class ReloadResponse(BaseModel):
    status: Literal["reloaded", "unchanged", "refused"]
    model_version: str | None
    index_version: str | None
    ranker_version: str | None
    reason: str | None = None


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    redis: Literal["ok", "degraded", "not_configured"]
    redis_breaker: str | None = Field(None, description="closed, open or half_open (Redis configured only)")
    model_version: str | None = None
    index_version: str | None = None
    ranker_version: str | None = None
    reason: str | None = Field(None, description="why not ready")
    last_refusal: Refusal | None = Field(None, description="the latest reload that was refused, if any")


class BundleInfo(BaseModel):
    name: str
    version: str
    type: str | None = None


class ModelInfo(BundleInfo):
    similarity: str | None = None


class IndexInfo(BundleInfo):
    factory: str | None = None
    metric: str
    num_items: int
    recall: dict[str, Any] | None = None
    filterable: dict[str, str] = Field(
        default_factory=dict,
        description="columns /recall's `filter` takes, and their kind (categorical, integer, numeric, boolean)",
    )


class Loaded(BaseModel):
    model: ModelInfo
    index: IndexInfo
    ranker: BundleInfo | None = None
    loaded_at: float
    last_refusal: Refusal | None = None


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every 4xx/5xx: `detail` is a sentence, or a list of field errors (then `message` joins them)."""

    detail: str | list[FieldError]
    message: str | None = None


class Served(BaseModel):
    """The versions a debug view was read from: the same triple a /recall at that moment is answered by."""

    model_version: str
    index_version: str
    ranker_version: str | None = None


class ItemView(Served):
    """GET /items/{item_id}: what the served triple knows of one item (read-only debug view)."""

    item_id: str
    in_catalog: bool = Field(description="the model bundle's catalog (items.parquet) has it: the towers trained on it")
    attributes: dict[str, Any] | None = Field(
        description="its items.parquet row as JSON values (item_id and popularity aside; NaN as null); null for an "
        "item that is not in the catalog (added to the index after training with `quiver-index add`)"
    )
    popularity: float | None = Field(
        description="its training events, the popularity fallback's order; null when not in the catalog (the "
        "fallback counts it 0)"
    )
    in_index: bool = Field(description="the served index holds it: /recall can return it")
    index_label: int | None = Field(description="its row in the served index (null: not in it)")
    filter_attributes: dict[str, Any] | None = Field(
        None,
        description="the values /recall's `filter` judges it by, as the served index holds them (kept current by "
        "`quiver-index add`, so an upserted item has them too); null when it is not in the index",
    )
    in_ranker: bool | None = Field(description="the TDM ranker's catalog has it (null: no ranker loaded)")


class UserView(Served):
    """GET /users/{user_id}: the user state a /recall without `history`/`features` would read now (read-only)."""

    user_id: str
    source: Literal["redis", "bundle", "none"] = Field(
        description="where the history comes from: Redis, the model bundle's users.parquet, or nowhere (a user "
        "known by a Redis profile only, or, with Redis unavailable, one the bundle lacks)"
    )
    history: list[str] = Field(
        description="item ids, oldest first, the latest the served models read (at most max(user tower, ranker) "
        "history lengths)"
    )
    history_timestamps: list[int] | None = Field(
        description="when each `history` item was clicked (seconds), where its source kept times"
    )
    tower_history_length: int = Field(description="how many of the latest `history` items the user tower reads")
    unknown_items: list[str] | None = Field(
        description="`history` items the served index does not hold (ids /recall could not return or exclude)"
    )
    profile: dict[str, Any] = Field(
        description="the profile fields the user tower reads: the bundle's row overlaid with Redis's hash"
    )
    redis: Literal["ok", "unavailable", "not_configured"] = Field(
        description="whether Redis was read for this answer (unavailable: down, slow or its breaker open)"
    )
    degraded: str | None = Field(
        None, description="why a /recall of this user now would not be fully personalised, when it would not"
    )
