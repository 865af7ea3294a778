"""B2I dynamic routing (MIND, DESIGN §4): a user's history items vote, over a few iterations, for K interest capsules.

Routing starts from logits b (T, K) drawn once from N(0, stddev^2) and kept as a buffer (saved with the weights):
redrawing them at every forward, as TorchEasyRec does, would make the same user's served interests differ from one
request to the next.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def squash(z: torch.Tensor) -> torch.Tensor:
    """(||z||^2 / (1 + ||z||^2)) * z / ||z||, written as ||z|| / (1 + ||z||^2) * z: equal, and 0 (with a finite
    gradient) at z = 0, where an empty capsule would otherwise divide by zero."""
    sq = (z * z).sum(-1, keepdim=True)  # (..., 1)
    return torch.sqrt(sq + 1e-12) / (1.0 + sq) * z


def active_interests(lengths: torch.Tensor, max_k: int) -> torch.Tensor:
    """ceil(clamp(log2(len), 1, max_k)) per user: (B,) int64. An empty history still gets one interest."""
    log_len = torch.log2(lengths.clamp_min(1).to(torch.float32))
    return torch.ceil(log_len.clamp(1.0, float(max_k))).to(torch.int64)


class CapsuleRouting(nn.Module):
    def __init__(
        self,
        in_dim: int,
        capsule_dim: int,
        max_k: int,
        max_len: int,
        num_iters: int = 3,
        scale: float = 20.0,
        stddev: float = 1.0,
        const_caps_num: bool = False,
    ) -> None:
        super().__init__()
        self.bilinear = nn.Linear(in_dim, capsule_dim, bias=False)  # W, shared by every (item, capsule) pair
        self.register_buffer("routing_init", torch.randn(max_len, max_k) * stddev)  # b0 (T_max, K)
        self.max_k, self.num_iters, self.scale, self.const_caps_num = max_k, num_iters, scale, const_caps_num

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, Din) history embeddings, mask (B, T) valid positions -> capsules (B, K, Dc) and their (B, K)
        mask of active interests; inactive capsules are exactly zero."""
        b_size, t = mask.shape
        if t > self.routing_init.shape[0]:
            raise ValueError(f"history length {t} exceeds the routing buffer ({self.routing_init.shape[0]} rows)")
        k = self.max_k
        n_active = torch.full_like(mask[:, 0], k, dtype=torch.int64) if self.const_caps_num else None
        if n_active is None:
            n_active = active_interests(mask.sum(1), k)  # (B,)
        caps_mask = torch.arange(k, device=x.device)[None, :] < n_active[:, None]  # (B, K)
        u_hat = self.bilinear(x)  # (B, T, Dc)
        u_hat_stop = u_hat.detach()  # routing iterations do not backpropagate into W
        u_hat_unit = F.normalize(u_hat_stop, dim=-1)
        b = self.routing_init[:t].expand(b_size, t, k)  # (B, T, K)
        pos = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        for it in range(self.num_iters):
            logits = (b * self.scale).masked_fill(~caps_mask[:, None, :], -math.inf)
            w = torch.softmax(logits, dim=-1) * pos  # (B, T, K) over capsules; padded items vote for none
            if it < self.num_iters - 1:
                z = torch.einsum("btk,btd->bkd", w, u_hat_stop)  # (B, K, Dc)
                b = w + torch.einsum("bkd,btd->btk", z, u_hat_unit)  # b = w + <z_k, normalize(u_hat_s)>
            else:
                z = torch.einsum("btk,btd->bkd", w, u_hat)  # (B, K, Dc), with gradient into W
        caps = squash(z) * caps_mask.unsqueeze(-1).to(z.dtype)  # (B, K, Dc)
        return caps, caps_mask
