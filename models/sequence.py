"""What SASRec and HSTU share (DESIGN §4 "Sequential user towers"): the right-aligned input, the item tower, and the
two training/serving outputs of a causal sequence encoder.

    history codes (B, T), oldest first, any padding layout
      -> right-aligned (padding on the left, the latest item at position L-1), trimmed to the longest row
      -> id embedding (the item tower's own table, `shared_with: item_id`) × √d + learnt position -> dropout
         (the √d scale, SASRec's, keeps the item signal above the positions' at the tables' small initial scale)
      -> blocks (the subclass: causal self-attention of one kind or another)
      -> (B, T, d) states: the state at t is the user after items <= t
    serving: the last position -> [Linear(output_dim)] -> [L2-normalise]                    (B, 1, D)
    training: every valid position, each one row of the softmax (its target: the next item)  (P, 1, D)

The item tower is a two-tower item tower: the item group (id table [+ attributes]) [-> MLP], so the index and the
service treat these models like DSSM. With the id feature alone, as wide as the output, and no hidden layer, the
item vector is the id embedding itself (input and output embeddings tied, as in SASRec).
"""

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from models.embedding import Batch, FeatureEmbedding
from models.match import MatchModel, Similarity, one_interest
from models.mlp import MLP, TowerConfig

HIST_TIME = "hist_time"  # batch key of the history's timestamps (B, L), laid out like the history codes


class SequenceConfig(BaseModel):
    """Keys both sequence models take; each adds its block's own."""

    model_config = ConfigDict(extra="forbid")

    max_seq_len: int = Field(default=50, ge=2)  # rows of the position table: the longest history read
    num_blocks: int = Field(default=2, ge=1)
    num_heads: int = Field(default=1, ge=1)
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)
    item_tower: TowerConfig = Field(default_factory=lambda: TowerConfig(hidden_units=[]))
    output_dim: int | None = Field(default=None, ge=1)  # default: the sequence width (the id embedding's)
    similarity: Similarity = "cosine"
    temperature: float = Field(default=1.0, gt=0)
    variational_dropout: list[Literal["item"]] = Field(default_factory=list)  # the item group only


def reads_time(cfg: BaseModel) -> bool:
    """Whether a model config reads the history's timestamps (batch key HIST_TIME) beside its codes."""
    return getattr(cfg, "time_buckets", 0) > 0


def right_align(codes: torch.Tensor) -> torch.Tensor:
    """(B, T) codes, 0 = padding anywhere -> the same items in the same order, padding moved to the left.

    A stable sort on "is an item" keeps the items' order, so a row that is already right-aligned is unchanged: the
    matrices of training (right-aligned), evaluation and serving (left-aligned) give one layout."""
    return codes.gather(1, aligned_columns(codes))


def aligned_columns(codes: torch.Tensor) -> torch.Tensor:
    """(B, T) the source column of each right-aligned position (gather anything laid out like the codes with it)."""
    return torch.sort((codes != 0).to(torch.int8), dim=1, stable=True).indices  # padding first


def full_causal(t: int, device: torch.device) -> torch.Tensor:
    """(1, 1, T, T) the causal mask of a batch without padding."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()[None, None]


def attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, T) valid positions -> (B, 1, T, T) bool, True where query t may read key s: s <= t and s valid.

    A padded query (left of every item) reads only itself, so no row is empty (an all-masked softmax is NaN); a valid
    query never reads padding, so padding never changes a valid position's output."""
    t = valid.shape[1]
    keys = valid[:, None, :] | torch.eye(t, dtype=torch.bool, device=valid.device)  # (B, T, T)
    return full_causal(t, valid.device) & keys.unsqueeze(1)  # (B, 1, T, T)


class SequenceModel(MatchModel):
    """A causal encoder over the history; subclasses build `self.blocks` and may add an `attention_bias`."""

    def __init__(self, cfg: SequenceConfig, embedding: FeatureEmbedding) -> None:
        super().__init__(embedding, cfg.similarity, cfg.temperature)
        groups = embedding.groups
        if groups.user:
            raise ValueError("features.user: a sequence model's user tower reads the history alone (no user features)")
        if len(groups.hist) != 1:
            raise ValueError("model: a sequence model reads exactly one features.hist sequence (the item ids)")
        self.hist_feature = groups.hist[0]
        if self.hist_feature.shared_with is None:
            raise ValueError(
                f"features.hist.{self.hist_feature.name}.shared_with: a sequence model embeds the history with the "
                "item tower's id table (set shared_with: item_id)"
            )
        d = self.hist_feature.embedding_dim
        if d % cfg.num_heads:
            raise ValueError(f"model.num_heads: {cfg.num_heads} does not divide the sequence width {d}")
        self.d_model = d
        self.max_seq_len = cfg.max_seq_len
        self.positions = nn.Embedding(cfg.max_seq_len, d)  # position L-1 is always the latest item
        nn.init.normal_(self.positions.weight, std=0.02)
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.final_norm = nn.LayerNorm(d)
        out = self.output_dim = cfg.output_dim or d
        self.user_out = nn.Linear(d, out) if out != d else nn.Identity()
        item_in = embedding.group_dim("item")
        tied = item_in == out and not cfg.item_tower.hidden_units
        self.item_mlp = nn.Identity() if tied else MLP(item_in, cfg.item_tower, out)

    def item_tower(self, batch: Batch) -> torch.Tensor:
        return self.item_mlp(self.embedding("item", batch))  # (N, item_in) -> (N, D)

    def row_shift_parameters(self) -> list[nn.Parameter]:
        # The history reads the id table directly, never item_mlp: its output bias only shifts a row's logits.
        if self.similarity != "inner_product" or not isinstance(self.item_mlp, MLP):
            return []
        return [self.item_mlp[-1].bias]

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The embedded sequence (B, T, d), its (B, T) valid mask and the (B, T) source column of each position:
        right-aligned, at most max_seq_len positions, trimmed to the longest row of the batch."""
        raw = batch[self.hist_feature.name]  # (B, T_in)
        cols = aligned_columns(raw)
        codes = raw.gather(1, cols)
        longest = max(int((codes != 0).sum(1).max()) if codes.numel() else 0, 1)
        keep = min(longest, self.max_seq_len)
        codes, cols = codes[:, -keep:], cols[:, -keep:]  # (B, T): the most recent items
        t = codes.shape[1]
        x = self.embedding.lookup(self.hist_feature, codes)  # (B, T, d)
        x = x * math.sqrt(self.d_model) + self.positions.weight[self.max_seq_len - t :]  # (B, T, d)
        valid = codes != 0
        return self.input_dropout(x) * valid.unsqueeze(-1), valid, cols

    def encode(
        self, x: torch.Tensor, valid: torch.Tensor, bias: torch.Tensor | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """(B, T, d) inputs -> (B, T, d) states, or (B, 1, d) the latest position's alone (`last_only`: the last
        block then computes one query row, which is all serving reads); `bias` (B, 1, T, T) is added to every
        block's attention logits."""
        mask = None if bool(valid.all()) else attention_mask(valid)  # (B, 1, T, T); None: no padding (served)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            q_from = x.shape[1] - 1 if last_only and i == last else 0
            x = block(x, mask, q_from=q_from) if bias is None else block(x, mask, bias, q_from=q_from)
        return self.final_norm(x)

    def attention_bias(self, batch: Batch, cols: torch.Tensor) -> torch.Tensor | None:
        """A per-batch bias on the attention logits, from what the batch carries besides the codes (HSTU's time
        buckets); none by default."""
        return None

    def hidden(self, batch: Batch, last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's (B, T, d) output (B, 1, d with `last_only`) and the (B, T) valid mask."""
        x, valid, cols = self.inputs(batch)
        return self.encode(x, valid, self.attention_bias(batch, cols), last_only), valid

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) encoder states -> (..., D) user vectors: [Linear(output_dim)] -> [L2-normalise]."""
        return self.finish(self.user_out(h))

    def states(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) the user vector after each position, and the (B, T) valid mask."""
        h, valid = self.hidden(batch)
        return self.head(h), valid

    def interests(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The state after the latest item, (B, 1, D); an empty history gives the state of padding alone."""
        h, _ = self.hidden(batch, last_only=True)
        return one_interest(self.head(h[:, -1]))  # (B, 1, D)

    def train_interests(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Every valid position, row-major (user by user, oldest first): (P, 1, D). The trainer lays the targets out
        in the same order (the next item of each valid input position)."""
        h, valid = self.hidden(batch)
        return one_interest(self.head(h[valid]))  # (P, 1, D)
