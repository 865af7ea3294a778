"""Embedding tables for every feature, and the pooling that turns a feature group into one vector per row."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.features import FeatureConfig, FeatureGroups
from models.variational_dropout import VariationalDropout

Batch = dict[str, torch.Tensor]  # feature name -> (B,) ids, (B, T) sequences / multi-ids, (B,) dense values


class FeatureEmbedding(nn.Module):
    """One table per feature that owns a vocabulary; `shared_with` features look up their owner's table.

    A group's output is the concatenation of its features: id -> (B, E), multi_id / sequence -> mean over the
    non-padding positions (B, E) (zeros when empty), dense -> the standardised value itself (B, 1).
    """

    def __init__(
        self,
        groups: FeatureGroups,
        table_sizes: dict[str, int],
        init_std: float = 0.05,
        variational_dropout: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.groups = groups
        # Optional per group (DESIGN §3): one learnt drop probability per feature of the group.
        self.dropout = nn.ModuleDict(
            {g: VariationalDropout(len(groups.group(g))) for g in variational_dropout if groups.group(g)}
        )
        self.tables = nn.ModuleDict()
        for f in groups.all():
            if f.kind == "dense" or f.shared_with is not None:
                continue
            table = nn.Embedding(table_sizes[f.name], f.embedding_dim, padding_idx=0)
            nn.init.normal_(table.weight, std=init_std)
            with torch.no_grad():
                table.weight[0].zero_()
            self.tables[f.name] = table

    def table(self, f: FeatureConfig) -> nn.Embedding:
        return self.tables[f.shared_with or f.name]  # type: ignore[return-value]

    def group_dim(self, group: str) -> int:
        return sum(1 if f.kind == "dense" else f.embedding_dim for f in self.groups.group(group))

    def lookup(self, f: FeatureConfig, x: torch.Tensor) -> torch.Tensor:
        """Un-pooled embeddings: (B,) -> (B, E), (B, T) -> (B, T, E)."""
        return self.table(f)(x)

    def pooled(self, f: FeatureConfig, x: torch.Tensor) -> torch.Tensor:
        """Mean over the non-padding positions, (B, T) -> (B, E); zeros for an empty row. Equal to the masked mean
        of lookup(f, x) over x != 0, but embedding_bag never materialises the (B, T, E) tensor and its
        backward accumulates per bag: 2.4x faster forward + backward for a 50-item history (B 1024, E 64, CPU)."""
        return F.embedding_bag(x, self.table(f).weight, mode="mean", padding_idx=0)

    def forward(self, group: str, batch: Batch) -> torch.Tensor:
        parts = []
        for f in self.groups.group(group):
            x = batch[f.name]
            if f.kind == "dense":
                parts.append(x.float().unsqueeze(-1))  # (B, 1)
            elif x.dim() == 1:
                parts.append(self.lookup(f, x))  # (B, E)
            else:
                parts.append(self.pooled(f, x))  # (B, T) -> (B, E)
        return torch.cat(self.drop(group, parts), dim=-1)

    def drop(self, group: str, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Variational dropout over the group's per-feature outputs, in feature order (a no-op when off)."""
        return self.dropout[group](parts) if group in self.dropout else parts

    def dropout_penalty(self, batch_size: int) -> torch.Tensor:
        terms = [vd.penalty(batch_size) for vd in self.dropout.values()]
        return torch.stack(terms).sum() if terms else torch.zeros(())
