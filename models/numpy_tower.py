"""DSSM's user tower in numpy, for the few-row batches a server sends at light load.

A DSSM user tower is a handful of embedding gathers, a masked mean and a two-layer MLP: at batch 1-2 its arithmetic
is a few thousand multiply-adds, and torch spends ~110 µs (~220 µs right after an index search) dispatching its ~40
ops, where the same maths as numpy calls takes ~30-45 µs. At half load the model process turns over about one
request per batch, so that fixed cost sets its busy time and, through queueing, the tail (bench/README "serve.py").

`NumpyTower.compile(model)` reads the eval-mode model's weights once (views of the torch tensors, no copies except
the transposed Linear weights) and returns None for anything it does not reproduce exactly (a model other than
DSSM, variational dropout, GELU, an unknown layer); callers then keep the torch forward. Inputs and outputs are
`Runtime.tower`'s: the encoded features (B,) / (B, T) codes and (B,) dense values in, (B, 1, D) float32 vectors and
a (B, 1) all-true mask out. Equal to the torch forward within float32 rounding (tests/test_numpy_tower.py).
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.dssm import DSSM
from models.embedding import FeatureEmbedding

Layer = Callable[[np.ndarray], np.ndarray]
MAX_ROWS = 16  # above this torch's per-op cost is amortised
# OpenBLAS (numpy's BLAS) runs a GEMM on the calling thread while m * n * k stays under 65,536 x 4; above it, it
# wakes threads that then spin beside the service's own. A batch stays under it in every layer.
SINGLE_THREAD_GEMM = 65_536 * 4


@dataclass(frozen=True)
class _Feature:
    name: str
    table: np.ndarray | None  # (V, E) float32; None for a dense feature, whose value goes in as it is


def _view(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _linear(layer: nn.Linear) -> Layer:
    w_t = np.ascontiguousarray(_view(layer.weight).T)  # (in, out)
    b = _view(layer.bias) if layer.bias is not None else None
    return (lambda x: x @ w_t + b) if b is not None else (lambda x: x @ w_t)


def _batch_norm(layer: nn.BatchNorm1d) -> Layer | None:
    """Eval-mode batch norm folded into one scale and shift."""
    if layer.running_mean is None or layer.running_var is None:
        return None
    scale = 1.0 / np.sqrt(_view(layer.running_var) + layer.eps)
    shift = -_view(layer.running_mean) * scale
    if layer.affine:
        scale, shift = scale * _view(layer.weight), shift * _view(layer.weight) + _view(layer.bias)
    scale, shift = scale.astype(np.float32), shift.astype(np.float32)
    return lambda x: x * scale + shift


def _prelu(layer: nn.PReLU) -> Layer:
    a = _view(layer.weight)  # (1,) or (C,)
    return lambda x: np.where(x >= 0, x, a * x)


def _layer(layer: nn.Module) -> Layer | None:
    if isinstance(layer, nn.Linear):
        return _linear(layer)
    if isinstance(layer, nn.BatchNorm1d):
        return _batch_norm(layer)
    if isinstance(layer, nn.ReLU):
        return lambda x: np.maximum(x, 0, out=x)
    if isinstance(layer, nn.Tanh):
        return np.tanh
    if isinstance(layer, nn.PReLU):
        return _prelu(layer)
    if isinstance(layer, nn.Dropout):
        return lambda x: x  # identity in eval mode
    return None  # GELU (numpy has no erf) and anything else: keep torch


def _features(embedding: FeatureEmbedding, group: str) -> list[_Feature] | None:
    if group in embedding.dropout:  # variational dropout scales each feature: not reproduced here
        return None
    out = []
    for f in embedding.groups.group(group):
        out.append(_Feature(f.name, None if f.kind == "dense" else _view(embedding.table(f).weight)))
    return out


class NumpyTower:
    """The compiled tower; call it on one batch's encoded features."""

    def __init__(self, features: list[_Feature], layers: list[Layer], normalize: bool, max_rows: int) -> None:
        self.features, self.layers, self.normalize = features, layers, normalize
        self.max_rows = max_rows  # the largest batch to send here; larger ones keep the torch forward

    @classmethod
    def compile(cls, model: nn.Module) -> "NumpyTower | None":
        if type(model) is not DSSM or model.training:
            return None
        features: list[_Feature] = []
        for group in ("user", "hist"):
            if model.embedding.groups.group(group):
                part = _features(model.embedding, group)
                if part is None:
                    return None
                features += part
        layers = [_layer(layer) for layer in model.user_mlp]
        widest = max((m.in_features * m.out_features for m in model.user_mlp if isinstance(m, nn.Linear)), default=1)
        max_rows = min(MAX_ROWS, SINGLE_THREAD_GEMM // widest)
        if not features or any(layer is None for layer in layers) or max_rows < 1:
            return None
        return cls(features, layers, model.similarity == "cosine", max_rows)  # type: ignore[arg-type]

    def __call__(self, feats: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        parts = []
        for f in self.features:
            x = feats[f.name]
            if f.table is None:
                parts.append(x.astype(np.float32)[:, None])  # (B, 1)
            elif x.ndim == 1:
                parts.append(f.table[x])  # (B, E)
            else:  # mean over the non-padding positions, zeros for an empty row (embedding_bag, padding_idx 0)
                keep = x != 0  # (B, T)
                rows = (f.table[x] * keep[:, :, None]).sum(axis=1)  # (B, T, E) -> (B, E)
                parts.append(rows / np.maximum(keep.sum(axis=1, keepdims=True), 1).astype(np.float32))
        h = np.concatenate(parts, axis=1, dtype=np.float32)  # (B, user_in)
        for layer in self.layers:
            h = layer(h)
        if self.normalize:  # F.normalize: x / max(|x|, 1e-12)
            h = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
        u = np.ascontiguousarray(h, dtype=np.float32)[:, None, :]  # (B, D) -> (B, 1, D)
        return u, np.ones((u.shape[0], 1), dtype=bool)
