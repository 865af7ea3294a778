"""How training turns a user's serving vectors into the user side of the softmax (DESIGN §3-4).

A match model serves `interests`: (B, K, D) vectors and a (B, K) mask of the active ones. Serving searches every
active vector and merges by best score; training needs one score per (user, candidate), chosen here by a free
function of (interests, mask, positives, scorer), so a model never re-implements the choice:

  - K = 1 (DSSM, DAT, one-interest users): the vector itself.
  - label_aware (DESIGN's MIND): attention on the positive, a = softmax_k(simi_pow · <interest_k, v_pos>) over the
    active interests, user = Σ_k a_k interest_k; every candidate is scored against that one vector.
  - best_interest: every candidate against its own best active interest, the score serving's merge ranks by.
"""

import math
from collections.abc import Callable
from typing import Literal

import torch

Scorer = Callable[[torch.Tensor], torch.Tensor]  # user vectors (R, D) -> logits (R, C) against the batch's items
TrainScoring = Literal["label_aware", "best_interest"]


def label_aware(interests: torch.Tensor, mask: torch.Tensor, v_pos: torch.Tensor, simi_pow: float) -> torch.Tensor:
    """interests (B, K, D), mask (B, K), v_pos (B, D) -> (B, D): attention of the positive over active interests."""
    att = simi_pow * torch.einsum("bkd,bd->bk", interests, v_pos)  # (B, K)
    att = torch.softmax(att.masked_fill(~mask, -math.inf), dim=-1)
    return torch.einsum("bk,bkd->bd", att, interests)


def best_interest(interests: torch.Tensor, mask: torch.Tensor, score: Scorer) -> torch.Tensor:
    """(B, C) logits: each candidate scored by the user's best active interest (an inactive one never wins)."""
    scores = torch.stack([score(interests[:, k].contiguous()) for k in range(interests.shape[1])])  # (K, B, C)
    floor = torch.finfo(scores.dtype).min
    return scores.masked_fill(~mask.T[:, :, None], floor).amax(0)


def choose(
    interests: torch.Tensor,
    mask: torch.Tensor,
    v_pos: torch.Tensor,
    score: Scorer,
    scoring: TrainScoring = "label_aware",
    simi_pow: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training user vector (B, D) (label-aware; handed to auxiliary losses) and the logits (B, C)."""
    if interests.shape[1] == 1:
        u = interests[:, 0]  # (B, D)
        return u, score(u)
    u = label_aware(interests, mask, v_pos, simi_pow)
    return u, score(u) if scoring == "label_aware" else best_interest(interests, mask, score)
