"""MatchModel: the two-tower contract every retrieval model (DSSM, DAT, MIND) implements.

A subclass supplies `user_tower` and `item_tower`; this class owns what they share: normalisation for cosine
similarity, the similarity layout of DESIGN §3 and the temperature.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.embedding import FeatureEmbedding
from models.similarity import similarity

Similarity = Literal["cosine", "inner_product"]


class MatchModel(nn.Module):
    def __init__(self, embedding: FeatureEmbedding, similarity: Similarity, temperature: float) -> None:
        super().__init__()
        self.embedding = embedding
        self.similarity = similarity
        self.temperature = temperature

    def user_tower(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """User features (+ history) -> (B, D)."""
        raise NotImplementedError

    def item_tower(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Item features -> (N, D)."""
        raise NotImplementedError

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.similarity == "cosine" else x

    def user_embedding(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.finish(self.user_tower(batch))

    def item_embedding(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.finish(self.item_tower(batch))

    def interests(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Serving output: (B, K, D) user vectors and a (B, K) bool mask of the active ones. Single-vector models
        give K = 1; MIND overrides this with its capsules. Retrieval searches every active vector and merges."""
        u = self.user_embedding(batch)  # (B, D)
        return u.unsqueeze(1), torch.ones(u.shape[0], 1, dtype=torch.bool, device=u.device)

    def forward(
        self,
        user_batch: dict[str, torch.Tensor],
        item_batch: dict[str, torch.Tensor],
        *,
        in_batch: bool,
        hard_neg_indices: torch.Tensor | None = None,
        item_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scaled logits sim(u, v, hard) / tau; both towers run inside one forward so DDP sees one graph.

        `item_index` (B + N + H,) lets the item tower run once per distinct item: item_batch then holds the distinct
        rows and item_index says which of them fills each slot (popular items recur in a batch and its negatives).
        """
        u = self.user_embedding(user_batch)  # (B, D)
        v = self.item_embedding(item_batch)  # (B + N + H, D), or (distinct, D) with item_index
        if item_index is not None:
            v = v[item_index]  # (B + N + H, D)
        logits = similarity(u, v, in_batch=in_batch, hard_neg_indices=hard_neg_indices) / self.temperature
        if hard_neg_indices is not None:
            # Empty hard cells hold finfo.min; dividing by tau < 1 would overflow them to -inf: keep them finite.
            logits = logits.clamp_min(torch.finfo(logits.dtype).min)
        return logits
