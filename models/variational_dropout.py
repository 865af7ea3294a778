"""Variational dropout over the features of one group (DESIGN §3): a learnt drop probability per feature.

The penalty rewards dropping, the softmax loss rewards keeping what helps, so after training d = sigmoid(p) ranks
the features by how little they are worth: a feature-selection signal at no extra training run.
"""

import torch
from torch import nn

TEMPERATURE = 0.1  # of the concrete relaxation
PENALTY = 0.01  # lambda


class VariationalDropout(nn.Module):
    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(n_features))  # p; d = sigmoid(p) starts at 0.5

    @property
    def drop_prob(self) -> torch.Tensor:
        return torch.sigmoid(self.logit)  # (F,)

    def forward(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """parts[f] is (B, ...) for feature f. Training: keep = 1 - z with z a concrete (relaxed Bernoulli) draw of
        "drop" per row and feature; evaluation: the expected keep, 1 - d."""
        d = self.drop_prob
        if self.training:
            b = parts[0].shape[0]
            eps = torch.rand(b, len(parts), device=d.device).clamp(1e-6, 1 - 1e-6)  # (B, F)
            z = torch.sigmoid((torch.logit(d) + torch.log(eps) - torch.log1p(-eps)) / TEMPERATURE)  # (B, F)
            keep = 1.0 - z
        else:
            keep = (1.0 - d).expand(parts[0].shape[0], -1)  # (B, F)
        out = []
        for f, x in enumerate(parts):
            scale = keep[:, f].reshape(-1, *([1] * (x.dim() - 1)))  # (B, 1, ...)
            out.append(x * scale.to(x.dtype))
        return out

    def penalty(self, batch_size: int) -> torch.Tensor:
        """lambda / B * sum_f (1 - d_f)."""
        return PENALTY / batch_size * (1.0 - self.drop_prob).sum()
