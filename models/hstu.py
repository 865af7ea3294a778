"""HSTU (DESIGN §4; Zhai et al. 2024): pointwise-gated causal attention over the history.

One block, for x (B, T, d), H heads of width dh = d / H:
    U, V, Q, K = split(SiLU(W1 LN(x)))                   each (B, T, d); Q, K, V split into H heads (B, H, T, dh)
    A = SiLU(Q Kᵀ / √dh + rab) ⊙ mask / n                (B, H, T, T); n = the query row's valid keys (s <= t)
    x = x + Dropout(W2 (LN(A V) ⊙ U))                    A V heads concatenated back to (B, T, d)
No softmax: the weights are SiLU's, so a key can add nothing (weight ~0) or more than its share; dividing by n keeps
the scale independent of how long the history is. rab is a learnt relative-position bias, one weight per distance
t - s (0 .. max_seq_len - 1, exact: histories are short enough that every distance is its own bucket), shared by
the heads; with `time_buckets` > 0 it also holds a learnt weight per time-distance bucket
floor(log2(max(|ts_t - ts_s|, 1))) (seconds: bucket 12 is about an hour, 16 a day, 20 two weeks), read from the
batch's history timestamps (HIST_TIME).
"""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from models.embedding import Batch, FeatureEmbedding
from models.sequence import HIST_TIME, SequenceConfig, SequenceModel, full_causal


class HSTUConfig(SequenceConfig):
    type: Literal["hstu"]
    time_buckets: int = Field(default=0, ge=0)  # 0: positions only; else log2 time-distance buckets (data timestamps)


class RelativePositionBias(nn.Module):
    """rab[t, s] = w[t - s] for s <= t (the causal mask hides s > t): (T, T)."""

    def __init__(self, max_len: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_len))

    def forward(self, t: int) -> torch.Tensor:
        pos = torch.arange(t, device=self.weight.device)
        distance = (pos[:, None] - pos[None, :]).clamp(0, len(self.weight) - 1)  # (T, T)
        return self.weight[distance]


class HSTUBlock(nn.Module):
    def __init__(self, d: int, num_heads: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(d)
        self.uvqk = nn.Linear(d, 4 * d)  # W1
        self.norm_attn = nn.LayerNorm(d)
        self.out = nn.Linear(d, d)  # W2
        self.rab = RelativePositionBias(max_len)
        self.dropout = nn.Dropout(dropout)
        self.num_heads = num_heads

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor | None = None, q_from: int = 0
    ) -> torch.Tensor:
        """x (B, T, d), mask (B, 1, T, T) True where query t reads key s (None: no padding, plain causal), bias
        (B, 1, T, T) or None -> (B, Tq, d): the query rows q_from.. (serving needs the last one alone; every key is
        still read), Tq = T - q_from."""
        b, t, d = x.shape
        tq, dh = t - q_from, d // self.num_heads
        u, v, q, k = F.silu(self.uvqk(self.norm_in(x))).chunk(4, dim=-1)  # each (B, T, d)
        u, q = u[:, q_from:], q[:, q_from:]  # (B, Tq, d)
        q = q.reshape(b, tq, self.num_heads, dh).transpose(1, 2)  # (B, H, Tq, dh)
        k, v = (z.reshape(b, t, self.num_heads, dh).transpose(1, 2) for z in (k, v))  # (B, H, T, dh)
        logits = q @ k.transpose(-1, -2) / dh**0.5 + self.rab(t)[q_from:]  # (B, H, Tq, T)
        if bias is not None:
            logits = logits + bias[:, :, q_from:]
        mask = (full_causal(t, x.device) if mask is None else mask)[:, :, q_from:]  # (B|1, 1, Tq, T)
        n = mask.sum(-1, keepdim=True).clamp_min(1)  # (B, 1, Tq, 1) valid keys of each query row
        a = F.silu(logits) * mask / n  # (B, H, Tq, T)
        av = (a @ v).transpose(1, 2).reshape(b, tq, d)  # (B, Tq, d)
        return x[:, q_from:] + self.dropout(self.out(self.norm_attn(av) * u))


class HSTU(SequenceModel):
    def __init__(self, cfg: HSTUConfig, embedding: FeatureEmbedding) -> None:
        super().__init__(cfg, embedding)
        self.cfg = cfg
        self.blocks = nn.ModuleList(
            HSTUBlock(self.d_model, cfg.num_heads, cfg.max_seq_len, cfg.dropout) for _ in range(cfg.num_blocks)
        )
        self.time_bias = nn.Parameter(torch.zeros(cfg.time_buckets)) if cfg.time_buckets else None

    def attention_bias(self, batch: Batch, cols: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, T, T) learnt weight of each (query, key) pair's time-distance bucket; None without time buckets."""
        if self.time_bias is None:
            return None
        if HIST_TIME not in batch:
            raise ValueError(f"hstu with time_buckets reads the history's timestamps: the batch has no {HIST_TIME!r}")
        ts = batch[HIST_TIME].gather(1, cols).to(torch.float64)  # (B, T) seconds, aligned with the codes
        gap = (ts[:, :, None] - ts[:, None, :]).abs().clamp_min(1.0)  # (B, T, T)
        bucket = torch.log2(gap).floor().long().clamp(0, len(self.time_bias) - 1)
        return self.time_bias[bucket].unsqueeze(1)
