"""The TDM reranker's training config: one YAML file, `model.type: tdm`, validated before anything runs.

Its own pydantic class, so the two-tower `Config.model` never accepts `tdm`; the data, features and output sections
are the two-tower ones. A wrong key is one line with its dotted path, as for every Quiver config.
"""

from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.features import FeatureGroups
from models.tdm import TDMConfig
from training.config import OutputConfig, read_yaml, validated
from training.data.config import DataConfig


class TDMNegatives(BaseModel):
    """Negatives per click: `per_positive` items, a `retrieved_ratio` share of them drawn from what the two-tower
    `retriever` bundle retrieves for the user (top `retrieve_k`, minus the user's training clicks), the rest drawn
    from the catalog by popularity^alpha."""

    model_config = ConfigDict(extra="forbid")

    per_positive: int = Field(default=4, ge=1)
    retrieved_ratio: float = Field(default=0.5, ge=0.0, le=1.0)
    alpha: float = Field(default=0.75, ge=0.0)
    retriever: str | None = None  # a two-tower model bundle (a version folder or a folder with LATEST)
    retrieve_k: int = Field(default=200, ge=1)
    valid_per_positive: int = Field(default=20, ge=1)  # fixed negatives per validation user, same mix
    # Which retrieved list a click's negatives come from: "click", the retriever's top retrieve_k for the history that
    # click saw (what would have been shown then); "user", one list per user from their whole training history.
    retrieved_from: Literal["click", "user"] = "user"
    # "retrieved": train only on clicks whose item is in their own click-time list, the only clicks a reranker of
    # that list can order (needs retrieved_from: click); "all": every click.
    positives: Literal["all", "retrieved"] = "all"


class TDMTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=256, ge=1)  # clicks per step; each brings its negatives
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    seed: int = 0
    num_threads: int = Field(default=1, ge=1)
    # Picks the best epoch: AUC / grouped AUC on held-out clicks vs sampled negatives, or rerank_NDCG@10 (each
    # validation user's retrieved candidates reordered by TDM: the benchmark's own measure; needs a retriever).
    valid_metric: Literal["auc", "gauc", "rerank_NDCG@10"] = "gauc"
    valid_users: int = Field(default=5000, ge=1)
    valid_rerank_users: int = Field(default=2000, ge=1)
    # Start the item tables from the retriever's (same feature name, kind and embedding_dim; matched by token).
    init_from_retriever: bool = False
    # Keep those tables fixed: TDM learns its attention and MLP over the retriever's item space, and its few clicks
    # per item cannot pull the embeddings into memorising them.
    freeze_initialised: bool = False
    max_minutes: float | None = Field(default=None, gt=0)  # stop after the epoch that crosses this budget
    clicks_per_epoch: int | None = Field(default=None, ge=1)  # a fresh random subset per epoch (large data sets)
    progress: bool = True


class RerankEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    retrieve_k: int = Field(default=200, ge=1)  # candidates the retriever hands to the reranker per test user
    ks: list[int] = Field(default_factory=lambda: [10])
    users: int | None = Field(default=None, ge=1)  # test-user subsample (seeded), for speed


class TDMTrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: DataConfig
    features: FeatureGroups
    model: Annotated[TDMConfig, Field(discriminator="type")]
    negatives: TDMNegatives = Field(default_factory=TDMNegatives)
    train: TDMTrainConfig = Field(default_factory=TDMTrainConfig)
    eval: RerankEvalConfig = Field(default_factory=RerankEvalConfig)
    output: OutputConfig

    @model_validator(mode="after")
    def _cross_checks(self) -> Self:
        if not self.features.hist:
            raise ValueError("features.hist: the TDM model needs a history (sequence) feature")
        hist = sum(f.embedding_dim for f in self.features.hist)
        query = sum(1 if f.kind == "dense" else f.embedding_dim for f in self.features.item)
        if self.model.history == "hist" and query > hist:
            raise ValueError(
                f"features.item: the query ({query} dims of item features) is wider than the history ({hist} dims of "
                "features.hist) it is zero-padded to; shrink it, or use model.history: item"
            )
        if self.negatives.retriever is None:
            if self.negatives.retrieved_ratio > 0:
                raise ValueError("negatives.retriever: retrieved_ratio > 0 needs a two-tower bundle path")
            if (
                self.train.init_from_retriever
                or self.train.valid_metric == "rerank_NDCG@10"
                or self.negatives.positives == "retrieved"
            ):
                raise ValueError(
                    "negatives.retriever: init_from_retriever, valid_metric rerank_NDCG@10 and positives 'retrieved' "
                    "need one"
                )
        if self.train.freeze_initialised and not self.train.init_from_retriever:
            raise ValueError("train.freeze_initialised: needs train.init_from_retriever")
        if self.negatives.positives == "retrieved" and self.negatives.retrieved_from != "click":
            raise ValueError("negatives.positives: 'retrieved' needs negatives.retrieved_from: click")
        if any(k < 1 or k > self.eval.retrieve_k for k in self.eval.ks):
            raise ValueError(f"eval.ks: every K must lie in [1, eval.retrieve_k={self.eval.retrieve_k}]")
        return self


def is_tdm(data: dict) -> bool:
    """Whether a parsed config file is for the TDM trainer (`model.type: tdm`)."""
    model = data.get("model")
    return isinstance(model, dict) and model.get("type") == "tdm"


def parse_tdm_config(data: object, source: str) -> TDMTrainingConfig:
    return validated(TDMTrainingConfig, data, source)


def load_tdm_config(path: str | Path) -> TDMTrainingConfig:
    return parse_tdm_config(read_yaml(path), str(path))
