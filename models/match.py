"""MatchModel: the two-tower contract every retrieval model (DSSM, DAT, MIND) implements.

A subclass supplies `user_tower` and `item_tower`; this class owns what they share: normalisation for cosine
similarity, the similarity layout of DESIGN §3 and the temperature.
"""

from collections.abc import Callable
from functools import partial
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.embedding import FeatureEmbedding
from models.similarity import similarity

Batch = dict[str, torch.Tensor]
Scorer = Callable[[torch.Tensor], torch.Tensor]  # user vectors (B, D) -> logits (B, C) against the batch's items

Similarity = Literal["cosine", "inner_product"]


class MatchOutput(NamedTuple):
    logits: torch.Tensor  # (B, B [+ S]) in-batch or (B, 1 + N [+ S]) sampled, already divided by tau
    aux_loss: torch.Tensor  # () added to the softmax loss


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

    def train_user_vector(self, batch: dict[str, torch.Tensor], v_pos: torch.Tensor) -> torch.Tensor:
        """The user side of the training similarity, (B, D). Single-vector models ignore the positives; MIND picks
        among its interests with label-aware attention on them."""
        return self.user_embedding(batch)

    def train_similarity(self, batch: Batch, v_pos: torch.Tensor, score: Scorer) -> tuple[torch.Tensor, torch.Tensor]:
        """The training user vector (B, D) and its logits score(u) = sim(u, v, hard). MIND may instead score each
        candidate against its best interest."""
        u = self.train_user_vector(batch, v_pos)  # (B, D)
        return u, score(u)

    def aux_loss(
        self,
        user_batch: dict[str, torch.Tensor],
        item_batch: dict[str, torch.Tensor],
        pos_rows: torch.Tensor,
        u: torch.Tensor,
        v_pos: torch.Tensor,
    ) -> torch.Tensor:
        """Loss terms beside the softmax: the variational-dropout penalty here (0 when off), plus DAT's
        adaptive-mimic losses in DAT. pos_rows (B,): the rows of item_batch holding the positives (a model gathers
        only the features it needs); u, v_pos: (B, D)."""
        return self.embedding.dropout_penalty(u.shape[0]).to(u)

    def forward(
        self,
        user_batch: dict[str, torch.Tensor],
        item_batch: dict[str, torch.Tensor],
        *,
        in_batch: bool,
        hard_neg_indices: torch.Tensor | None = None,
        item_index: torch.Tensor | None = None,
    ) -> MatchOutput:
        """Scaled logits sim(u, v, hard) / tau and the auxiliary loss; both towers run inside one forward so DDP
        sees one graph.

        `item_index` (B + N + H,) lets the item tower run once per distinct item: item_batch then holds the distinct
        rows and item_index says which of them fills each slot (popular items recur in a batch and its negatives).
        """
        v = self.item_embedding(item_batch)  # (B + N + H, D), or (distinct, D) with item_index
        if item_index is not None:
            v = v[item_index]  # (B + N + H, D)
        b = next(iter(user_batch.values())).shape[0]
        score = partial(similarity, v=v, in_batch=in_batch, hard_neg_indices=hard_neg_indices)  # (B, D) -> logits
        u, logits = self.train_similarity(user_batch, v[:b], score)
        logits = logits / self.temperature
        if hard_neg_indices is not None:
            # Empty hard cells hold finfo.min; dividing by tau < 1 would overflow them to -inf: keep them finite.
            logits = logits.clamp_min(torch.finfo(logits.dtype).min)
        pos_rows = item_index[:b] if item_index is not None else torch.arange(b, device=u.device)  # (B,)
        return MatchOutput(logits, self.aux_loss(user_batch, item_batch, pos_rows, u, v[:b]))
