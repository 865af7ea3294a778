"""MatchModel: the two-tower contract every retrieval model implements.

A model supplies two things: `interests(batch)`, its serving user vectors (B, K, D) with a (B, K) mask of the active
ones (K = 1 for single-vector towers), and `item_tower(batch)`, its item vectors (N, D). This class owns what they
share: normalisation for cosine similarity, the similarity layout of DESIGN §3, the temperature, and the training
forward, which turns interests into one score per (row, candidate) with the free function of
`models/interest_choice.py`.

Training scores `train_interests(batch)`, the serving interests unless a model says otherwise: a sequence model
returns one row per valid position there (every position predicts the next item), so its batch of B users becomes
P training rows with no other change to the forward.
"""

from collections.abc import Callable
from functools import partial
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.embedding import Batch, FeatureEmbedding
from models.interest_choice import TrainScoring, choose
from models.similarity import similarity

Similarity = Literal["cosine", "inner_product"]
# Where each row's candidates are (DESIGN §3): in_batch (R, R + N) label i; sampled (R, 1 + N) label 0; full: the
# item rows after the R positives are the whole catalog, (R, I), label = the positive's catalog row.
Layout = Literal["in_batch", "sampled", "full"]


def one_interest(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A single-vector tower's (B, D) output as interests: (B, 1, D) and an all-active (B, 1) mask."""
    return u.unsqueeze(1), torch.ones(u.shape[0], 1, dtype=torch.bool, device=u.device)


class MatchOutput(NamedTuple):
    logits: torch.Tensor  # (R, R + N [+ S]) in-batch, (R, 1 + N [+ S]) sampled, (R, I) full; divided by tau
    aux_loss: torch.Tensor  # () added to the softmax loss


class MatchModel(nn.Module):
    # How training picks among several interests (models/interest_choice.py); MIND sets these from its config.
    train_scoring: TrainScoring = "label_aware"
    simi_pow: float = 10.0

    def __init__(self, embedding: FeatureEmbedding, similarity: Similarity, temperature: float) -> None:
        super().__init__()
        self.embedding = embedding
        self.similarity = similarity
        self.temperature = temperature

    def interests(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Serving output: (B, K, D) user vectors (normalised under cosine) and the (B, K) bool mask of the active
        ones. Retrieval searches every active vector and merges by best score."""
        raise NotImplementedError

    def item_tower(self, batch: Batch) -> torch.Tensor:
        """Item features -> (N, D), before normalisation."""
        raise NotImplementedError

    def train_interests(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """What training scores, (R, K, D) and (R, K): the serving interests of the B users by default."""
        return self.interests(batch)

    def row_shift_parameters(self) -> list[nn.Parameter]:
        """Parameters that only add one amount to every logit of a row, which no softmax (or BPR) loss can move:
        their true gradient is zero. train.precision bf16 freezes them, because rounding the logits' gradient to
        bfloat16 leaves its rows a biased nonzero sum, and Adam turns that steady sign into full-size steps (the
        row offset reached thousands on ML-1M within three epochs, where bfloat16 keeps 8 bits)."""
        return []

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.similarity == "cosine" else x

    def item_embedding(self, batch: Batch) -> torch.Tensor:
        return self.finish(self.item_tower(batch))

    def user_embedding(self, batch: Batch) -> torch.Tensor:
        """(B, D) for single-vector models; a multi-interest model must be asked for its interests()."""
        vectors, _ = self.interests(batch)
        if vectors.shape[1] != 1:
            raise NotImplementedError(f"{type(self).__name__} serves several vectors per user: call interests()")
        return vectors[:, 0]

    def aux_loss(
        self, user_batch: Batch, item_batch: Batch, pos_rows: torch.Tensor, u: torch.Tensor, v_pos: torch.Tensor
    ) -> torch.Tensor:
        """Loss terms beside the softmax: the variational-dropout penalty here (0 when off), plus DAT's
        adaptive-mimic losses in DAT. pos_rows (R,): the rows of item_batch holding the positives (a model gathers
        only the features it needs); u, v_pos: (R, D)."""
        return self.embedding.dropout_penalty(u.shape[0]).to(u.device)  # float32 even when autocast makes u bfloat16

    def forward(
        self,
        user_batch: Batch,
        item_batch: Batch,
        *,
        layout: Layout,
        hard_neg_indices: torch.Tensor | None = None,
        item_index: torch.Tensor | None = None,
    ) -> MatchOutput:
        """Scaled logits sim(u, v, hard) / tau and the auxiliary loss; both towers run inside one forward so DDP
        sees one graph.

        The item rows are [positives (R); sampled negatives (N); hard negatives (H)], R the rows train_interests
        gives; with layout full, [positives (R); the catalog (I)]. `item_index` (R + N + H,) lets the item tower
        run once per distinct item: item_batch then holds the distinct rows and item_index says which of them fills
        each slot (popular items recur in a batch and its negatives).
        """
        v = self.item_embedding(item_batch)  # (R + N + H, D), or (distinct, D) with item_index
        if item_index is not None:
            v = v[item_index]  # (R + N + H, D)
        interests, mask = self.train_interests(user_batch)  # (R, K, D), (R, K)
        r = interests.shape[0]
        score: Callable[[torch.Tensor], torch.Tensor]  # (R, D) -> logits
        if layout == "full":
            score = lambda u: u @ v[r:].T  # noqa: E731 (R, I)
        else:
            score = partial(similarity, v=v, in_batch=layout == "in_batch", hard_neg_indices=hard_neg_indices)
        u, logits = choose(interests, mask, v[:r], score, self.train_scoring, self.simi_pow)
        if self.temperature != 1.0:  # a no-op division of a (R, I) matrix is a tenth of a full-softmax step
            logits = logits / self.temperature
        if hard_neg_indices is not None:
            # Empty hard cells hold finfo.min; dividing by tau < 1 would overflow them to -inf: keep them finite.
            logits = logits.clamp_min(torch.finfo(logits.dtype).min)
        pos_rows = item_index[:r] if item_index is not None else torch.arange(r, device=u.device)  # (R,)
        return MatchOutput(logits, self.aux_loss(user_batch, item_batch, pos_rows, u, v[:r]))
