"""Model configs by `type`, the classes that build them, and the one function that builds a model from config +
feature schema.

Used by training and by bundle loading alike, so a bundle is rebuilt by code, never unpickled. Every match model is
constructed as `cls(cfg, embedding)`.
"""

from typing import Annotated

from pydantic import Field

from models.dat import DAT, DATConfig
from models.dssm import DSSM, DSSMConfig
from models.embedding import FeatureEmbedding
from models.features import FeatureGroups
from models.hstu import HSTU, HSTUConfig
from models.match import MatchModel
from models.mind import MIND, MINDConfig
from models.sasrec import SASRec, SASRecConfig
from models.tdm import TDM, TDMConfig

MATCH_MODELS: dict[str, type[MatchModel]] = {"dssm": DSSM, "dat": DAT, "mind": MIND, "sasrec": SASRec, "hstu": HSTU}

ModelConfig = Annotated[DSSMConfig | DATConfig | MINDConfig | SASRecConfig | HSTUConfig, Field(discriminator="type")]


def build_model(cfg: ModelConfig, groups: FeatureGroups, table_sizes: dict[str, int]) -> MatchModel:
    embedding = FeatureEmbedding(groups, table_sizes, variational_dropout=cfg.variational_dropout)
    return MATCH_MODELS[cfg.type](cfg, embedding)  # type: ignore[call-arg]


# Every model a bundle may hold: the two-tower models above plus rankers. Training's `Config.model` stays ModelConfig,
# so a two-tower config never accepts `type: tdm` (the TDM trainer has its own config, training/tdm_config.py).
BundleModelConfig = Annotated[ModelConfig | TDMConfig, Field(discriminator="type")]


def build_bundle_model(
    cfg: ModelConfig | TDMConfig, groups: FeatureGroups, table_sizes: dict[str, int]
) -> MatchModel | TDM:
    if isinstance(cfg, TDMConfig):
        return TDM(cfg, FeatureEmbedding(groups, table_sizes))
    return build_model(cfg, groups, table_sizes)
