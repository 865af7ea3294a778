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


class RecallRequest(UserInput):
    k: int = Field(100, ge=1, le=MAX_K)
    model: Id | None = Field(None, description="retriever bundle name; must be the loaded one (default: it)")
    exclude_seen: bool = Field(True, description="leave out the items of the user's history")
    exclude: list[Id] = Field(default_factory=list, max_length=MAX_LIST)
    rerank: bool = Field(False, description="reorder the retrieved candidates by the TDM ranker")


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
