"""MatchModel similarity, loss and training Recall@K exactly as DESIGN §3.

Item rows arrive stacked as [positives (B); sampled negatives (N); hard negatives (H)]. With in-batch negatives the
positives of the other rows are the negatives, and any N shared sampled rows after them are more columns of the same
(B, B + N) matrix (TorchEasyRec's mixed layout; N = 0 is plain in-batch).
"""

import os

import torch
import torch.nn.functional as F

# Sampled-mode similarity runs the Triton kernel (models/kernels/sampled_similarity.py) on CUDA tensors when triton
# is installed; QUIVER_TRITON=0 (read at import) or setting this to False forces the torch reference below. CPU
# tensors always take the reference: Triton's CPU interpreter is for the kernel tests only.
USE_TRITON = os.environ.get("QUIVER_TRITON", "1") != "0"


def _use_triton(u: torch.Tensor, v: torch.Tensor) -> bool:
    if not (USE_TRITON and u.is_cuda and v.is_cuda and u.dtype == v.dtype):
        return False
    if u.dtype not in (torch.float32, torch.bfloat16, torch.float16):  # e.g. float64 checks stay on the reference
        return False
    from models.kernels import triton_available  # lazy: triton is a dev extra

    return triton_available()


def similarity(
    u: torch.Tensor,
    v: torch.Tensor,
    *,
    in_batch: bool,
    hard_neg_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """u (B, D), v (B + N + H, D) -> logits.

    in-batch: (B, B + N [+ S]), label of row i is column i. sampled: (B, 1 + N [+ S]), the positive is column 0.
    hard_neg_indices (H, 2) = (row, slot): hard negative j is scored against its own user only and lands at
    (row_j, slot_j) of a (B, S = max_slot + 1) block; empty cells hold the dtype's most negative finite value
    (no NaN, no gradient).
    """
    if not in_batch and _use_triton(u, v):
        from models.kernels.sampled_similarity import sampled_similarity

        return sampled_similarity(u, v, hard_neg_indices)
    b = u.shape[0]
    h = 0 if hard_neg_indices is None else hard_neg_indices.shape[0]
    n_items = v.shape[0] - h
    if in_batch:
        if n_items < b:
            raise ValueError(
                f"in-batch similarity needs at least B item rows before the hard negatives, got {n_items} for B={b}"
            )
        blocks = [u @ v[:n_items].T]  # (B, B + N)
    else:
        pos = (u * v[:b]).sum(-1, keepdim=True)  # (B, 1)
        neg = u @ v[b:n_items].T  # (B, N)
        blocks = [pos, neg]
    if h:
        assert hard_neg_indices is not None
        blocks.append(hard_block(u, v[n_items:], hard_neg_indices))
    return torch.cat(blocks, dim=1)


def hard_block(u: torch.Tensor, hard: torch.Tensor, hard_neg_indices: torch.Tensor) -> torch.Tensor:
    """u (B, D), hard (H, D), indices (H, 2) -> (B, S) by a dense scatter (index_put), not a sparse tensor."""
    rows, slots = hard_neg_indices[:, 0], hard_neg_indices[:, 1]
    scores = (u[rows] * hard).sum(-1)  # (H,)
    width = int(slots.max().item()) + 1
    empty = torch.full((u.shape[0], width), torch.finfo(scores.dtype).min, dtype=scores.dtype, device=u.device)
    return empty.index_put((rows, slots), scores)


def mask_collisions(
    logits: torch.Tensor, targets: torch.Tensor, columns: torch.Tensor, start: int, label_diagonal: bool
) -> torch.Tensor:
    """Mask the cells whose candidate is the row's own target item, other than the label (most negative value, no
    gradient): a negative equal to the positive would be pushed away from the user and pulled in at once.

    targets (R,) and columns (C,) are catalog rows; the columns are the logits' start..start+C. label_diagonal: the
    in-batch layout, where column i of row i is the label itself and stays."""
    hit = targets[:, None] == columns[None, :]  # (R, C)
    if label_diagonal:
        hit[torch.arange(len(targets)), torch.arange(len(targets))] = False
    if not bool(hit.any()):
        return logits
    full = torch.zeros_like(logits, dtype=torch.bool)
    full[:, start : start + columns.shape[0]] = hit
    return logits.masked_fill(full, torch.finfo(logits.dtype).min)


def labels_for(logits: torch.Tensor, in_batch: bool) -> torch.Tensor:
    """Labels come from the shape: arange in-batch, column 0 with a sampler."""
    b = logits.shape[0]
    if in_batch:
        return torch.arange(b, device=logits.device)
    return torch.zeros(b, dtype=torch.long, device=logits.device)


def softmax_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax cross-entropy; weighted as mean(ce * w) / mean(w), and 0 when the weights sum to 0."""
    return weighted_mean(F.cross_entropy(logits, labels, reduction="none"), weights)  # of (B,)


def weighted_mean(per_row: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """mean(x * w) / mean(w): scaling every weight changes nothing; 0 (with a zero gradient) when they sum to 0."""
    if weights is None:
        return per_row.mean()
    w_mean = weights.mean()
    if w_mean.item() == 0:
        return (per_row * 0).sum()
    return (per_row * weights).mean() / w_mean


def bpr_loss(logits: torch.Tensor, labels: torch.Tensor, num: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise ranking term: each row's label logit against `num` of its columns drawn uniformly, as
    -log sigmoid(s_pos - s_neg) = softplus(s_neg - s_pos), averaged (weighted like softmax_loss).

    The softmax spends its gradient on the columns the model already scores high (the hard, mostly popular ones);
    this term spends it on a uniform draw, which is what the sampled protocols rank the positive against (NCF: 99
    random unseen items). A drawn column that is the label contributes softplus(0) with zero gradient; a masked
    collision (-inf) contributes 0."""
    logits = logits.float()  # a difference of bfloat16 logits (train.precision: bf16) would keep 8 bits
    r, c = logits.shape
    cols = torch.randint(0, c, (r, num), device=logits.device)  # (R, m)
    pos = logits.gather(1, labels[:, None])  # (R, 1)
    return weighted_mean(F.softplus(logits.gather(1, cols) - pos).mean(dim=1), weights)  # of (R,)


def recall_at_k(logits: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[int, int]:
    """Training Recall@K: the target of row i is column labels[i] (the identity in-batch, column 0 with a sampler,
    the positive's catalog row in the full layout); returns (hits, total).

    Each row has one target, so "target among the top-K columns" is "fewer than K columns score above it": one
    comparison pass instead of a top-k over (B, C) (which cost a tenth of a training step). Ties go to the target.
    """
    b = logits.shape[0]
    target = logits.gather(1, labels.unsqueeze(1))  # (B, 1)
    above = (logits > target).sum(1, dtype=torch.int32)  # (B,); int32: a quarter less time than int64
    return int((above < k).sum().item()), b
