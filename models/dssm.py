"""DSSM: two independent MLP towers, user (profile + pooled history) and item (attributes)."""

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from models.embedding import FeatureEmbedding
from models.match import Batch, MatchModel, Similarity, one_interest
from models.mlp import MLP, TowerConfig


class DSSMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["dssm"]
    user_tower: TowerConfig = Field(default_factory=TowerConfig)
    item_tower: TowerConfig = Field(default_factory=TowerConfig)
    output_dim: int = Field(default=64, ge=1)
    similarity: Similarity = "cosine"
    temperature: float = Field(default=1.0, gt=0)
    variational_dropout: list[Literal["user", "item", "hist"]] = Field(default_factory=list)  # groups, off by default


class DSSM(MatchModel):
    def __init__(self, cfg: DSSMConfig, embedding: FeatureEmbedding) -> None:
        super().__init__(embedding, cfg.similarity, cfg.temperature)
        user_in = embedding.group_dim("user") + embedding.group_dim("hist")
        self.user_mlp = MLP(user_in, cfg.user_tower, cfg.output_dim)
        self.item_mlp = MLP(embedding.group_dim("item"), cfg.item_tower, cfg.output_dim)

    def interests(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [self.embedding(g, batch) for g in ("user", "hist") if self.embedding.groups.group(g)]
        u = self.finish(self.user_mlp(torch.cat(parts, dim=-1)))  # (B, user_in) -> (B, D)
        return one_interest(u)  # (B, 1, D), (B, 1)

    def item_tower(self, batch: Batch) -> torch.Tensor:
        return self.item_mlp(self.embedding("item", batch))  # (N, item_in) -> (N, D)

    def row_shift_parameters(self) -> list[nn.Parameter]:
        # Under the inner product the item tower's output bias b adds u . b to every item of the user's row.
        # Under cosine the normalisation makes b matter.
        return [self.item_mlp[-1].bias] if self.similarity == "inner_product" else []
