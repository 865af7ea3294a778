"""SASRec (DESIGN §4): a causal Transformer over the history; the user is the state after the latest item.

Block, pre-norm (`layer: prenorm`):
    x = x + Dropout(MHA(LN(x)))          causal, padded keys masked (scaled_dot_product_attention)
    x = x + Dropout(FFN(LN(x)))          FFN = Linear(d, m·d) -> GELU -> Linear(m·d, d)
`layer: ligr` gates each residual branch with a learnt sigmoid of the same normalised input (LiGR):
    x = x + Dropout(sigmoid(G(LN(x))) ⊙ MHA(LN(x))), and likewise for the FFN,
so a block can open or shut each branch per channel instead of always adding it whole.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from models.embedding import FeatureEmbedding
from models.sequence import SequenceConfig, SequenceModel


class SASRecConfig(SequenceConfig):
    type: Literal["sasrec"]
    ffn_mult: int = Field(default=1, ge=1)  # the FFN's hidden width, in multiples of d (SASRec's paper: 1)
    layer: Literal["prenorm", "ligr"] = "prenorm"


class Residual(nn.Module):
    """x + Dropout(f(LN(x))), optionally gated: x + Dropout(sigmoid(G(LN(x))) ⊙ f(LN(x)))."""

    def __init__(self, d: int, dropout: float, gated: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.gate = nn.Linear(d, d) if gated else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, branch: "nn.Module", *args: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)  # (B, T, d)
        out = branch(h, *args)
        if self.gate is not None:
            out = torch.sigmoid(self.gate(h)) * out
        return x + self.dropout(out)


class SelfAttention(nn.Module):
    """Multi-head softmax attention; `mask` (B, 1, T, T) True where a query may read a key."""

    def __init__(self, d: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.num_heads, self.dropout = num_heads, dropout

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)  # (B,H,T,dh)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, T, dh)
        return self.out(a.transpose(1, 2).reshape(b, t, d))


class SASRecBlock(nn.Module):
    def __init__(self, d: int, num_heads: int, ffn_mult: int, dropout: float, gated: bool) -> None:
        super().__init__()
        self.attn = SelfAttention(d, num_heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_mult * d, d))
        self.attn_res = Residual(d, dropout, gated)
        self.ffn_res = Residual(d, dropout, gated)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attn_res(x, self.attn, mask)  # (B, T, d)
        return self.ffn_res(x, self.ffn)


class SASRec(SequenceModel):
    def __init__(self, cfg: SASRecConfig, embedding: FeatureEmbedding) -> None:
        super().__init__(cfg, embedding)
        self.cfg = cfg
        gated = cfg.layer == "ligr"
        self.blocks = nn.ModuleList(
            SASRecBlock(self.d_model, cfg.num_heads, cfg.ffn_mult, cfg.dropout, gated) for _ in range(cfg.num_blocks)
        )
