"""The tower MLP of DESIGN §4: hidden layers Linear -> [BatchNorm] -> activation -> [Dropout], then a linear output."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "prelu": nn.PReLU, "tanh": nn.Tanh}


class TowerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden_units: list[int] = Field(default_factory=lambda: [256, 128])
    activation: Literal["relu", "gelu", "prelu", "tanh"] = "relu"
    batch_norm: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class MLP(nn.Sequential):
    """The activation is applied after the last hidden layer too; the output layer has none (L2 normalisation,
    when the similarity is cosine, happens in the model). output_dim None: hidden layers only (MIND's user_mlp),
    and `out_dim` is the last hidden width."""

    def __init__(self, in_dim: int, cfg: TowerConfig, output_dim: int | None) -> None:
        layers: list[nn.Module] = []
        for units in cfg.hidden_units:
            layers.append(nn.Linear(in_dim, units))
            if cfg.batch_norm:
                layers.append(nn.BatchNorm1d(units))
            layers.append(ACTIVATIONS[cfg.activation]())
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            in_dim = units
        if output_dim is not None:
            layers.append(nn.Linear(in_dim, output_dim))
            in_dim = output_dim
        super().__init__(*layers)
        self.out_dim = in_dim
