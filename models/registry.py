"""Model configs by `type`, and the one function that builds a model from config + feature schema.

Used by training and by bundle loading alike, so a bundle is rebuilt by code, never unpickled.
"""

from typing import Annotated

from pydantic import Field

from models.dssm import DSSM, DSSMConfig
from models.embedding import FeatureEmbedding
from models.features import FeatureGroups
from models.match import MatchModel

ModelConfig = Annotated[DSSMConfig, Field(discriminator="type")]


def build_model(cfg: ModelConfig, groups: FeatureGroups, table_sizes: dict[str, int]) -> MatchModel:
    embedding = FeatureEmbedding(groups, table_sizes)
    if isinstance(cfg, DSSMConfig):
        return DSSM(cfg, embedding)
    raise ValueError(f"unknown model type {cfg.type!r}")
