"""Request and response bodies of the HTTP API (DESIGN §7).

Requests are strict: an unknown field is a 422 naming it (a misspelt `exclude_seen` should not silently do
nothing). Histories are item ids oldest first, the order the clicks happened.
"""

from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Timestamp = Annotated[int, Field(ge=0, strict=True)]  # integer seconds, the clock of the training data
FeatureValue = str | int | float | bool | None
MAX_K = 1000
MAX_CANDIDATES = 1000
MAX_LIST = 10_000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
        None, max_length=256, description="profile fields that override the stored profile for this request"
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
    candidates: list[Id] = Field(min_length=1, max_length=MAX_CANDIDATES)
    k: int | None = Field(None, ge=1, le=MAX_CANDIDATES, description="return the best k (default: all)")


class EventsRequest(Strict):
    user_id: Id
    items: list[Id] = Field(min_length=1, max_length=1000, description="clicked item ids, oldest first")
    timestamps: list[Timestamp] | None = Field(
        None, max_length=1000, description="when each click happened (seconds; default: when it arrives)"
    )

    @model_validator(mode="after")
    def _times_match_items(self) -> Self:
        if self.timestamps is not None and len(self.timestamps) != len(self.items):
            raise ValueError(f"timestamps: {len(self.timestamps)} timestamps for {len(self.items)} items")
        return self


class ScoredItem(BaseModel):
    item_id: str
    score: float
    interest: int | None = Field(None, description="which interest vector retrieved it (multi-interest models)")
    retrieval_score: float | None = Field(None, description="the index score, when `score` is the ranker's")


class Answer(BaseModel):
    model_version: str
    index_version: str
    ranker_version: str | None = None
    user_state: str = Field(description="where the history came from: request, redis, bundle or none")
    degraded: str | None = Field(None, description="why the answer is not fully personalised, when it is not")
    unknown_items: dict[str, list[str]] | None = Field(
        None, description="per request field, item ids not in the served catalog (reported, never scored)"
    )


class RecallResponse(Answer):
    items: list[ScoredItem]


class RankResponse(Answer):
    items: list[ScoredItem]


class EventsResponse(BaseModel):
    user_id: str
    history_length: int
    unknown_items: list[str] = Field(default_factory=list)


class ReloadResponse(BaseModel):
    status: str
    model_version: str | None
    index_version: str | None
    ranker_version: str | None
    reason: str | None = None
