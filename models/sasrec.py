"""SASRec (DESIGN §4): a causal Transformer over the history; the user is the state after the latest item.

Block, pre-norm (`layer: prenorm`):
    x = x + Dropout(MHA(LN(x)))          causal, padded keys masked (scaled_dot_product_attention)
    x = x + Dropout(FFN(LN(x)))          FFN = Linear(d, m·d) -> GELU -> Linear(m·d, d)
`layer: ligr` gates each residual branch with a learnt sigmoid of the same normalised input (LiGR):
    x = x + Dropout(sigmoid(G(LN(x))) ⊙ MHA(LN(x))), and likewise for the FFN,
so a block can open or shut each branch per channel instead of always adding it whole.
"""

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from models.embedding import FeatureEmbedding
from models.sequence import SequenceConfig, SequenceModel, full_causal


class SASRecConfig(SequenceConfig):
    type: Literal["sasrec"]
    ffn_mult: int = Field(default=1, ge=1)  # the FFN's hidden width, in multiples of d (SASRec's paper: 1)
    layer: Literal["prenorm", "ligr"] = "prenorm"


class Residual(nn.Module):
    """x + Dropout(f(LN(x))), optionally gated: x + Dropout(sigmoid(G(LN(x))) ⊙ f(LN(x))); for the query rows
    q_from.. only (the branch reads every row of LN(x) and returns the query rows)."""

    def __init__(self, d: int, dropout: float, gated: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.gate = nn.Linear(d, d) if gated else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], q_from: int = 0) -> torch.Tensor:
        h = self.norm(x)  # (B, T, d)
        out = branch(h)  # (B, Tq, d), Tq = T - q_from
        x, h = x[:, q_from:], h[:, q_from:]
        if self.gate is not None:
            out = torch.sigmoid(self.gate(h)) * out
        return x + self.dropout(out)


class SelfAttention(nn.Module):
    """Multi-head softmax attention; `mask` (B, 1, T, T) True where a query may read a key, None when no position is
    padding (plain causal: SDPA's faster unmasked kernels). Only the query rows q_from.. are computed (serving needs
    the last one alone; every key is still read)."""

    def __init__(self, d: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.num_heads, self.dropout = num_heads, dropout

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None, q_from: int = 0) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)  # (B,H,T,dh)
        q = q[:, :, q_from:]  # (B, H, Tq, dh)
        p = self.dropout if self.training else 0.0
        if mask is None and q_from in (0, t - 1):  # no padding: plain causal, and the last query reads every key
            a = F.scaled_dot_product_attention(q, k, v, is_causal=q_from == 0, dropout_p=p)  # (B, H, Tq, dh)
        else:
            mask = full_causal(t, h.device) if mask is None else mask
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, :, q_from:], dropout_p=p)
        return self.out(a.transpose(1, 2).reshape(b, t - q_from, d))


class SASRecBlock(nn.Module):
    def __init__(self, d: int, num_heads: int, ffn_mult: int, dropout: float, gated: bool) -> None:
        super().__init__()
        self.attn = SelfAttention(d, num_heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_mult * d, d))
        self.attn_res = Residual(d, dropout, gated)
        self.ffn_res = Residual(d, dropout, gated)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, q_from: int = 0) -> torch.Tensor:
        """(B, T, d) -> (B, T - q_from, d): the states of the query rows q_from.."""
        x = self.attn_res(x, lambda h: self.attn(h, mask, q_from), q_from)  # (B, Tq, d)
        return self.ffn_res(x, self.ffn)


class SASRec(SequenceModel):
    def __init__(self, cfg: SASRecConfig, embedding: FeatureEmbedding) -> None:
        super().__init__(cfg, embedding)
        self.cfg = cfg
        gated = cfg.layer == "ligr"
        self.blocks = nn.ModuleList(
            SASRecBlock(self.d_model, cfg.num_heads, cfg.ffn_mult, cfg.dropout, gated) for _ in range(cfg.num_blocks)
        )
