"""Model inputs from a bundle's own tables, for the stages that may not import `training/` (index, service).

The encodings are the bundle's saved ones, so an item or user is encoded exactly as in training. Histories are item-id
lists, oldest first; they become the (B, L) code matrices the towers read: left-aligned, 0-padded, the latest L kept.
"""

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from models.bundle import ModelBundle
from models.embedding import Batch
from models.features import FeatureConfig, FeatureEncoder
from models.sequence import HIST_TIME


def history_length(bundle: ModelBundle) -> int:
    """L used for user-tower queries: the training config's query_seq_len (else max_seq_len)."""
    data = bundle.manifest.get("config", {}).get("data", {})
    return int(data.get("query_seq_len") or data.get("max_seq_len") or 50)


def item_features(encoder: FeatureEncoder, items: pa.Table) -> dict[str, np.ndarray]:
    """Every item-group feature for each catalog row: id (I,), multi_id (I, max_len), dense (I,)."""
    return encoder.encode_table("item", items, items.num_rows)


def user_features(encoder: FeatureEncoder, users: pa.Table) -> dict[str, np.ndarray]:
    return encoder.encode_table("user", users, users.num_rows)


ItemCodeLookup = Callable[[FeatureConfig, list[str]], np.ndarray]  # item ids -> (n,) codes of one hist feature


def history_codes(
    encoder: FeatureEncoder, histories: Sequence[Sequence[str]], length: int, lookup: ItemCodeLookup | None = None
) -> dict[str, np.ndarray]:
    """Each hist-group feature as (B, length) codes; unknown item ids map to the out-of-vocabulary code 1.

    lookup: what gives the flat ids' codes in place of `encoder.encode_item_ids` (the service's memo of them,
    service/tower_inputs.py); it must return exactly what the encoder would."""
    cut = [list(h)[-length:] if length > 0 else [] for h in histories]
    lengths = np.fromiter((len(h) for h in cut), dtype=np.int64, count=len(cut))
    ids = [str(x) for h in cut for x in h]
    flat = pa.array(ids, pa.string()) if lookup is None else None
    out: dict[str, np.ndarray] = {}
    for f in encoder.groups.group("hist"):
        codes = encoder.encode_item_ids(f, flat) if flat is not None else lookup(f, ids)  # (sum lengths,)
        mat = np.zeros((len(cut), length), dtype=np.int64)
        mask = np.arange(length)[None, :] < lengths[:, None]  # (B, L) left-aligned
        mat[mask] = codes
        out[f.name] = mat
    return out


def history_times(times: Sequence[Sequence[int]], length: int) -> np.ndarray:
    """Each history's timestamps as (B, length), laid out like history_codes (the latest `length`, left-aligned)."""
    out = np.zeros((len(times), length), dtype=np.int64)
    for row, t in enumerate(times):
        cut = list(t)[-length:] if length > 0 else []
        out[row, : len(cut)] = cut
    return out


def to_batch(feats: dict[str, np.ndarray], rows: np.ndarray | slice, device: torch.device) -> Batch:
    return {k: torch.from_numpy(np.ascontiguousarray(v[rows])).to(device) for k, v in feats.items()}


def _batches(n: int, batch: int) -> Iterator[slice]:
    for s in range(0, n, batch):
        yield slice(s, min(s + batch, n))


@torch.no_grad()
def item_vectors(
    bundle: ModelBundle,
    items: pa.Table | None = None,
    batch: int = 8192,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Iterator[tuple[slice, np.ndarray]]:
    """Item-tower output over a catalog (default: the bundle's), batch by batch: (rows, (b, D) float32).

    A generator, so a caller can add each batch to an index and memory stays bounded by `batch`.
    """
    table = bundle.items if items is None else items
    feats = item_features(bundle.encoder, table)
    dev = torch.device(device)
    steps = _batches(table.num_rows, batch)
    for rows in tqdm(steps, total=-(-table.num_rows // batch), desc="item tower", disable=not progress):
        v = bundle.model.item_embedding(to_batch(feats, rows, dev))  # (b, D)
        yield rows, v.float().cpu().numpy()


@torch.no_grad()
def user_vectors(
    bundle: ModelBundle,
    users: pa.Table,
    histories: Sequence[Sequence[str]],
    device: torch.device | str = "cpu",
    times: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """User-tower output for rows of a user table (user_id + profile columns) and their histories (and, for a model
    that reads them, the histories' timestamps): (B, K, D) interest vectors and their (B, K) mask (K = 1 except for
    multi-interest models)."""
    dev = torch.device(device)
    length = history_length(bundle)
    feats = user_features(bundle.encoder, users) | history_codes(bundle.encoder, histories, length)
    if times is not None:
        feats[HIST_TIME] = history_times(times, length)
    return bundle.model.interests(to_batch(feats, slice(None), dev))
