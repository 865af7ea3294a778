"""Negative sampling (DESIGN §5): one pool of N catalog items per batch, shared by every row."""

import numpy as np
import torch

from models.errors import QuiverError


class NegativeSampler:
    """Draws N items with probability proportional to popularity^alpha (alpha = 0: uniform), by default never one
    of the batch's positives.

    Items never seen in training count as popularity 1, so cold catalog items are still pushed away sometimes.
    `log_q` is log(N * q(item)), the expected number of draws, for the sampled-softmax correction
    `logit - log_q`; q is the distribution after removing the batch's positives.

    exclude_positives False (the sequence models: a batch's P positions hold a large share of the catalog's popular
    items, and removing them all would skew the pool): draw from the whole catalog; the trainer masks a negative
    out of the one row whose target it is.
    """

    def __init__(
        self, popularity: np.ndarray, num: int, alpha: float, seed: int, exclude_positives: bool = True
    ) -> None:
        weights = np.maximum(popularity.astype(np.float64), 1.0) ** alpha  # (I,)
        self.probs = weights / weights.sum()
        self.cdf = np.cumsum(self.probs)
        self.num = num
        self.exclude_positives = exclude_positives
        self.rng = np.random.default_rng(seed)
        if num >= len(popularity):
            raise QuiverError(f"negatives.num: {num} must be smaller than the catalog ({len(popularity)} items)")

    def sample(self, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """positives (B,) catalog rows -> negatives (N,) catalog rows, log_q (N,) float32."""
        excluded = np.unique(positives) if self.exclude_positives else np.zeros(0, dtype=np.int64)
        mass_left = 1.0 - self.probs[excluded].sum()
        if mass_left <= 1e-12:
            raise ValueError("every sampleable item is a positive of this batch")
        out = np.empty(0, dtype=np.int64)
        while len(out) < self.num:
            # Oversample in proportion to the excluded mass, then drop excluded items: exact rejection sampling.
            draw = int((self.num - len(out)) / mass_left * 1.1) + 16
            u = self.rng.random(draw) * self.cdf[-1]
            cand = np.minimum(np.searchsorted(self.cdf, u, side="right"), len(self.cdf) - 1)
            if len(excluded):
                cand = cand[~np.isin(cand, excluded, assume_unique=False)]
            out = np.concatenate([out, cand])
        out = out[: self.num]
        log_q = np.log(self.num * self.probs[out] / mass_left).astype(np.float32)
        return out, log_q


def log_q_correction(logits: torch.Tensor, log_q: torch.Tensor, start: int = 1) -> torch.Tensor:
    """Subtract log q from the sampled-negative columns start..start+N of the scaled logits: 1.. in the sampled
    layout (B, 1 + N [+ S]), B.. in the mixed one (B, B + N [+ S]).

    The logits are already divided by tau: the correction applies to what the softmax sees."""
    n = log_q.shape[0]
    correction = torch.zeros(logits.shape[1], dtype=logits.dtype, device=logits.device)
    correction[start : start + n] = log_q.to(logits.dtype)
    return logits - correction
