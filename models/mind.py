"""MIND: multi-interest network with dynamic routing (DESIGN §4).

The user tower turns the history into up to K interest vectors (capsule routing), each joined with the user's
static features. Serving returns every active interest, and retrieval searches each and merges; training scores
them by label-aware attention or by best interest (`models/interest_choice.py`).
"""

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from models.capsule import CapsuleRouting
from models.embedding import FeatureEmbedding
from models.interest_choice import TrainScoring
from models.match import Batch, MatchModel, Similarity
from models.mlp import MLP, TowerConfig


class MINDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["mind"]
    user_tower: TowerConfig = Field(default_factory=lambda: TowerConfig(hidden_units=[64]))  # user_mlp
    hist_seq_mlp: list[int] = Field(default_factory=list)  # optional bias-free layers before routing
    capsule_dim: int | None = Field(default=None, ge=1)  # default: the history embedding width
    max_k: int = Field(default=5, ge=1)
    num_iters: int = Field(default=3, ge=1)
    routing_scale: float = Field(default=20.0, gt=0)
    routing_stddev: float = Field(default=1.0, gt=0)
    const_caps_num: bool = False
    max_seq_len: int = Field(default=50, ge=1)  # rows of the fixed routing-logit buffer: the longest history
    concat_tower: TowerConfig = Field(default_factory=lambda: TowerConfig(hidden_units=[128]))  # concat_mlp
    item_tower: TowerConfig = Field(default_factory=TowerConfig)
    output_dim: int = Field(default=64, ge=1)
    similarity: Similarity = "cosine"
    temperature: float = Field(default=1.0, gt=0)
    simi_pow: float = Field(default=10.0, gt=0)  # label-aware attention sharpness
    # How training scores a candidate. label_aware (DESIGN §4): every candidate against the one vector that
    # attention on the positive built. best_interest (a deviation, off by default): each candidate against its own
    # best active interest, the score that serving's merge ranks by, so a negative that is close to another of the
    # user's interests is penalised in training too (label-aware training never sees it).
    train_scoring: TrainScoring = "label_aware"
    variational_dropout: list[Literal["user", "item", "hist"]] = Field(default_factory=list)


class MIND(MatchModel):
    def __init__(self, cfg: MINDConfig, embedding: FeatureEmbedding) -> None:
        super().__init__(embedding, cfg.similarity, cfg.temperature)
        self.cfg = cfg
        self.train_scoring, self.simi_pow = cfg.train_scoring, cfg.simi_pow
        groups = embedding.groups
        if not groups.group("hist"):
            raise ValueError("MIND needs a hist feature group (the sequence it routes into interests)")
        self.hist_features = groups.group("hist")
        hist_dim = sum(f.embedding_dim for f in self.hist_features)
        layers: list[nn.Module] = []
        for units in cfg.hist_seq_mlp:
            layers += [nn.Linear(hist_dim, units, bias=False), nn.ReLU()]
            hist_dim = units
        self.hist_seq_mlp = nn.Sequential(*layers)
        capsule_dim = cfg.capsule_dim or hist_dim
        self.routing = CapsuleRouting(
            hist_dim,
            capsule_dim,
            cfg.max_k,
            cfg.max_seq_len,
            cfg.num_iters,
            cfg.routing_scale,
            cfg.routing_stddev,
            cfg.const_caps_num,
        )
        self.user_mlp = MLP(embedding.group_dim("user"), cfg.user_tower, None) if groups.group("user") else None
        user_dim = self.user_mlp.out_dim if self.user_mlp is not None else 0
        self.concat_mlp = MLP(capsule_dim + user_dim, cfg.concat_tower, cfg.output_dim)
        self.item_mlp = MLP(embedding.group_dim("item"), cfg.item_tower, cfg.output_dim)

    def item_tower(self, batch: Batch) -> torch.Tensor:
        return self.item_mlp(self.embedding("item", batch))  # (N, item_in) -> (N, D)

    def interests(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, D) interest vectors, each L2-normalised separately under cosine, and the (B, K) active mask."""
        codes = batch[self.hist_features[0].name]  # (B, T), 0 = padding
        seq = [self.embedding.lookup(f, batch[f.name]) for f in self.hist_features]  # each (B, T, E_f)
        x = self.hist_seq_mlp(torch.cat(self.embedding.drop("hist", seq), dim=-1))  # (B, T, Dh)
        caps, mask = self.routing(x, codes != 0)  # (B, K, Dc), (B, K)
        if self.user_mlp is not None:
            user = self.user_mlp(self.embedding("user", batch))  # (B, Du)
            caps = torch.cat([caps, user.unsqueeze(1).expand(-1, caps.shape[1], -1)], dim=-1)  # (B, K, Dc + Du)
        return self.finish(self.concat_mlp(caps)), mask  # (B, K, D)
