"""DAT: dual augmented two-tower (DESIGN §4).

Each tower gets one more input, an "augmented vector" looked up by the *other side's* id space: a_u by user id in the
user tower, a_v by item id in the item tower. The adaptive-mimic losses pull a_u towards the item vectors the user
clicked and a_v towards the users who clicked the item, so each tower sees a summary of the other side's history
that plain two towers can never exchange. At serving a_u / a_v are just more embedding lookups.
"""

from typing import Literal, Self

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from models.dssm import DSSMConfig
from models.embedding import FeatureEmbedding
from models.match import Batch, MatchModel, one_interest
from models.mlp import MLP


class DATConfig(DSSMConfig):
    """DSSM's towers and similarity, plus the augmented vectors and their losses."""

    type: Literal["dat"]  # type: ignore[assignment]
    # The id features whose codes index the augmented tables (their vocabularies size the tables).
    user_id_feature: str = "user_id"
    item_id_feature: str = "item_id"
    # Size of a_u / a_v. They are mimics of the other tower's output, so it must be output_dim; accepted only to
    # reject a config that sets something else.
    augment_dim: int | None = Field(default=None, ge=1)
    amm_user_weight: float = Field(default=0.5, ge=0)  # w_u
    amm_item_weight: float = Field(default=0.5, ge=0)  # w_i

    @model_validator(mode="after")
    def _augment_dim(self) -> Self:
        if self.augment_dim is not None and self.augment_dim != self.output_dim:
            raise ValueError(
                f"model.augment_dim: {self.augment_dim} must equal output_dim ({self.output_dim}): the AMM loss "
                "compares the augmented vectors with the other tower's output"
            )
        return self


class DAT(MatchModel):
    def __init__(self, cfg: DATConfig, embedding: FeatureEmbedding) -> None:
        super().__init__(embedding, cfg.similarity, cfg.temperature)
        self.cfg = cfg
        rows = {}  # the augmented tables have as many rows as the id feature's own table
        for group, name in (("user", cfg.user_id_feature), ("item", cfg.item_id_feature)):
            found = [f for f in embedding.groups.group(group) if f.name == name and f.kind in ("id", "hash")]
            if not found:
                raise ValueError(f"model.{group}_id_feature: {name!r} is not an id feature of the {group} group")
            rows[group] = embedding.table(found[0]).num_embeddings
        self.user_aug = nn.Embedding(rows["user"], cfg.output_dim)  # a_u
        self.item_aug = nn.Embedding(rows["item"], cfg.output_dim)  # a_v
        for table in (self.user_aug, self.item_aug):
            nn.init.normal_(table.weight, std=0.05)
        user_in = embedding.group_dim("user") + embedding.group_dim("hist") + cfg.output_dim
        self.user_mlp = MLP(user_in, cfg.user_tower, cfg.output_dim)
        self.item_mlp = MLP(embedding.group_dim("item") + cfg.output_dim, cfg.item_tower, cfg.output_dim)

    def interests(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [self.embedding(g, batch) for g in ("user", "hist") if self.embedding.groups.group(g)]
        a_u = self.user_aug(batch[self.cfg.user_id_feature])  # (B, D)
        u = self.finish(self.user_mlp(torch.cat([*parts, a_u], dim=-1)))  # (B, user_in) -> (B, D)
        return one_interest(u)  # (B, 1, D), (B, 1)

    def item_tower(self, batch: Batch) -> torch.Tensor:
        a_v = self.item_aug(batch[self.cfg.item_id_feature])  # (N, D)
        return self.item_mlp(torch.cat([self.embedding("item", batch), a_v], dim=-1))  # (N, item_in) -> (N, D)

    def aux_loss(
        self, user_batch: Batch, item_batch: Batch, pos_rows: torch.Tensor, u: torch.Tensor, v_pos: torch.Tensor
    ) -> torch.Tensor:
        """Adaptive-mimic losses over the B positive pairs, a sum over batch and dims (not a mean):
            L_u = w_u * sum (normalize(a_u) - stopgrad(v))^2,   L_i = w_i * sum (normalize(a_v) - stopgrad(u))^2
        The targets are detached, so only the augmented embeddings receive this gradient."""
        a_u = self.user_aug(user_batch[self.cfg.user_id_feature])  # (B, D)
        a_v = self.item_aug(item_batch[self.cfg.item_id_feature][pos_rows])  # (B, D)
        loss_u = ((F.normalize(a_u, dim=-1) - v_pos.detach()) ** 2).sum()
        loss_i = ((F.normalize(a_v, dim=-1) - u.detach()) ** 2).sum()
        amm = self.cfg.amm_user_weight * loss_u + self.cfg.amm_item_weight * loss_i
        return amm + super().aux_loss(user_batch, item_batch, pos_rows, u, v_pos)
