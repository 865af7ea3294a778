"""Fused inner-product score + top-k for exact retrieval on a GPU; `exact_topk_reference` (matmul + topk) is the truth.

Why not matmul + topk: for 256 queries over 10M items the (Q, I) score matrix is 10 GB of fp32 written and read
again, eight times the 1.3 GB of bf16 items that have to be read anyway. The fused kernel reads every item once and
keeps only a few candidates per (query, item tile).

Design, exact by construction:
  1. Kernel, 1-D grid over (item tile, query block), query block fastest so that the programs sharing a tile run
     together and the tile comes from L2 after the first read. A tile is TILE = CHUNK * CHUNKS items; each program
     walks its tile CHUNK (128) items at a time, scores (BQ, CHUNK) with tl.dot (fp32 accumulation), and keeps an
     exact running top-M per query (M in 2..16, unsorted, with its minimum): while some query's best remaining
     chunk score beats its running minimum, that score replaces the minimum and leaves the chunk. Each query takes at
     most M scores per chunk, and usually none once its running set is good. The program writes the M (score, item)
     pairs per query: candidates (Q, T * M) with T = number of tiles.
  2. torch.topk over the candidates gives a provisional top-k per query; kth = its k-th score.
  3. Certificate: every item a tile did not emit scores <= that tile's M-th best (the minimum of what it emitted).
     So the provisional answer is exact unless a tile's M-th emitted score is strictly above kth ("saturated": it
     had M items in the top-k and may hide more). Saturated (query, tile) pairs are rescored in full with torch
     (gather + bmm, fp32) and merged, with their emitted copies dropped first; one round suffices because kth only
     grows. Ties at kth are harmless: a dropped item then scores <= kth, so the returned scores equal the
     reference's and indices can differ only among equal scores, as between any two top-k implementations.
     A query has at most k/M saturated tiles (each holds M scores > kth), so the repair is bounded; with the top-k
     items spread at random it is rarely needed: M is chosen so that the expected number of saturated tiles per
     query, T * P(Poisson(k * TILE / I) >= M), stays below 1/2.
  4. When no M <= 16 meets that (k is a sizeable fraction of I), the score matrix is barely bigger than the answer
     and the reference (matmul + topk) runs instead.

Traffic per query block: items I * D * 2 bytes (bf16) read once per tile from HBM, candidates Q * T * M * 8 bytes
written and read back; with TILE = 1024 and M = 2 that is 1/64 of the score matrix matmul + topk would materialise.
The block sizes are untuned guesses (no GPU where this was written); `bench/kernels.py` measures them.
"""

import math

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

CHUNK = 128  # items scored per tl.dot
MAX_CHUNKS = 8  # chunks per tile: TILE up to 1024 items per (query, tile) candidate set
M_CHOICES = (2, 4, 8, 16)  # candidates kept per (query, tile)
BK_MAX = 64


@triton.jit
def _topm_kernel(
    q_ptr, it_ptr, cs_ptr, ci_ptr,
    Q, I, D, n_qblocks,
    sq0, sq1, si0, si1, sc0,
    BQ: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr, BK: tl.constexpr, M: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    qb = pid % n_qblocks  # query block varies fastest: neighbours in launch order share the item tile
    t = pid // n_qblocks
    rq = qb * BQ + tl.arange(0, BQ)  # (BQ,)
    q_ok = rq < Q
    rq64 = rq.to(tl.int64)
    cols = tl.arange(0, CHUNK)  # (CHUNK,)
    mcols = tl.arange(0, M)  # (M,)
    best = tl.full((BQ, M), float("-inf"), tl.float32)  # running top-M scores, unsorted
    best_i = tl.full((BQ, M), -1, tl.int32)  # their item indices
    lo = tl.min(best, axis=1)  # (BQ,) running minimum
    for c in range(CHUNKS):
        base = (t * CHUNKS + c) * CHUNK
        ri = base + cols  # (CHUNK,) item index
        i_ok = ri < I
        ri64 = ri.to(tl.int64)
        s = tl.zeros((BQ, CHUNK), dtype=tl.float32)
        for k0 in range(0, D, BK):
            rk = k0 + tl.arange(0, BK)
            k_ok = rk < D
            qq = tl.load(q_ptr + rq64[:, None] * sq0 + rk[None, :] * sq1, mask=q_ok[:, None] & k_ok[None, :], other=0.0)
            it = tl.load(
                it_ptr + ri64[None, :] * si0 + rk[:, None] * si1, mask=k_ok[:, None] & i_ok[None, :], other=0.0
            )
            if UPCAST:  # Triton's CPU interpreter multiplies bf16 dot operands as raw bits; fp32 is exact for them
                qq = qq.to(tl.float32)
                it = it.to(tl.float32)
            s = tl.dot(qq, it, s, input_precision=PRECISION)  # (BQ, BK) @ (BK, CHUNK)
        s = tl.where(q_ok[:, None] & i_ok[None, :], s, float("-inf"))
        top = tl.max(s, axis=1)  # (BQ,) best score left in the chunk
        while tl.sum((top > lo).to(tl.int32), axis=0) > 0:
            # argmax / argmin as a min over matching columns: the first on ties, and plain min reductions
            # (Triton's interpreter runs tl.argmax's tuple combine function element by element, far slower)
            arg = tl.min(tl.where(s == top[:, None], cols[None, :], CHUNK), axis=1)  # (BQ,) its column
            take = top > lo  # (BQ,) rows whose running set accepts it
            slot = tl.min(tl.where(best == lo[:, None], mcols[None, :], M), axis=1)  # (BQ,) the running minimum's slot
            put = take[:, None] & (mcols[None, :] == slot[:, None])  # (BQ, M)
            best = tl.where(put, top[:, None], best)
            best_i = tl.where(put, (base + arg)[:, None], best_i)
            # the column leaves the chunk either way: if it was not taken it is <= lo, and lo never decreases
            s = tl.where(cols[None, :] == arg[:, None], float("-inf"), s)
            top = tl.max(s, axis=1)
            lo = tl.min(best, axis=1)
    out = rq64[:, None] * sc0 + (t * M + mcols)[None, :]  # (BQ, M) candidate columns of tile t
    tl.store(cs_ptr + out, best, mask=q_ok[:, None])
    tl.store(ci_ptr + out, best_i, mask=q_ok[:, None])


INTERPRETED = not isinstance(_topm_kernel, JITFunction)  # picks the interpreter's bf16 dot workaround


def exact_topk_reference(queries: torch.Tensor, items: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """queries (Q, D), items (I, D) -> (scores (Q, k), indices (Q, k)), inner product, sorted descending."""
    return torch.topk(queries @ items.T, k, dim=1)  # (Q, I) materialised


def _poisson_tail(lam: float, m: int) -> float:
    """P(X >= m) for X ~ Poisson(lam): how likely a tile holds m of the top-k when they fall at random."""
    term, head = math.exp(-lam), 0.0
    for j in range(m):
        head += term
        term *= lam / (j + 1)
    return max(0.0, 1.0 - head)


def plan(n_items: int, k: int) -> tuple[int, int] | None:
    """(chunks per tile, M) for the fused kernel, or None when the reference is the better tool.

    Prefers the largest tile (fewest candidates: Q * I * M / TILE) whose M <= 16 keeps the expected saturated tiles
    per query under 1/2 and still leaves at least 2k candidates per query.
    """
    for chunks in (MAX_CHUNKS, 4, 2, 1):
        tile = CHUNK * chunks
        if chunks > 1 and tile > n_items:
            continue
        tiles = triton.cdiv(n_items, tile)
        lam = k * tile / n_items
        for m in M_CHOICES:
            if tiles * m >= 2 * k and tiles * _poisson_tail(lam, m) <= 0.5:
                return chunks, m
    return None


def _candidates(queries: torch.Tensor, items: torch.Tensor, chunks: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel launch: -> candidate scores (Q, T * M) fp32 and item indices (Q, T * M) int32."""
    n_q, d = queries.shape
    n_items = items.shape[0]
    tiles = triton.cdiv(n_items, CHUNK * chunks)
    bq = min(64, max(16, triton.next_power_of_2(n_q)))
    n_qblocks = triton.cdiv(n_q, bq)
    cand_s = torch.empty(n_q, tiles * m, dtype=torch.float32, device=queries.device)
    cand_i = torch.empty(n_q, tiles * m, dtype=torch.int32, device=queries.device)
    prec = "ieee" if queries.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
    _topm_kernel[(tiles * n_qblocks,)](
        queries, items, cand_s, cand_i, n_q, n_items, d, n_qblocks,
        *queries.stride(), *items.stride(), cand_s.stride(0),
        BQ=bq, CHUNK=CHUNK, CHUNKS=chunks, BK=min(BK_MAX, max(16, triton.next_power_of_2(d))), M=m,
        PRECISION=prec, UPCAST=INTERPRETED,
    )  # fmt: skip
    return cand_s, cand_i


def _repair(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    tile: int,
    m: int,
    cand_s: torch.Tensor,
    top_s: torch.Tensor,
    top_i: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rescore saturated (query, tile) pairs in full and merge them in; returns (scores, indices, pairs repaired)."""
    n_q, n_items = queries.shape[0], items.shape[0]
    bound = cand_s.view(n_q, -1, m).min(dim=2).values  # (Q, T): every unemitted item of the tile scores <= this
    sat = bound > top_s[:, -1:]  # (Q, T)
    n_sat = int(sat.sum().item())
    if n_sat == 0:
        return top_s, top_i, 0
    qi, ti = sat.nonzero(as_tuple=True)  # (P,), row-major: grouped by query
    counts = sat.sum(dim=1)  # (Q,)
    slot = torch.arange(n_sat, device=sat.device) - (counts.cumsum(0) - counts)[qi]  # rank of the pair in its query
    width = int(counts.max().item())
    extra_s = torch.full((n_q, width, tile), float("-inf"), device=queries.device)  # (Q, W, TILE)
    extra_i = torch.zeros((n_q, width, tile), dtype=torch.long, device=queries.device)
    offs = torch.arange(tile, device=queries.device)
    step = max(1, (1 << 24) // (tile * queries.shape[1]))  # pairs per bmm: bounds the gathered (P, TILE, D) copy
    for p0 in range(0, n_sat, step):
        q_p, t_p, s_p = qi[p0 : p0 + step], ti[p0 : p0 + step], slot[p0 : p0 + step]
        idx = t_p[:, None] * tile + offs[None, :]  # (P, TILE)
        ok = idx < n_items
        rows = items[idx.clamp(max=n_items - 1)].float()  # (P, TILE, D)
        sc = torch.bmm(rows, queries[q_p].float().unsqueeze(2)).squeeze(2)  # (P, TILE)
        extra_s[q_p, s_p] = sc.masked_fill(~ok, float("-inf"))
        extra_i[q_p, s_p] = idx
    # drop the provisional entries of saturated tiles: their tiles come back whole in extra_*
    dup = sat.gather(1, top_i.clamp(min=0) // tile)  # (Q, k); -1 marks an unfilled slot (score -inf)
    merged_s = torch.cat([top_s.masked_fill(dup, float("-inf")), extra_s.view(n_q, -1)], dim=1)
    merged_i = torch.cat([top_i, extra_i.view(n_q, -1)], dim=1)
    top_s, pos = merged_s.topk(k, dim=1)
    return top_s, merged_i.gather(1, pos), n_sat


def fused_topk(
    queries: torch.Tensor, items: torch.Tensor, k: int, chunks: int, m: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The fused path with an explicit plan -> (scores (Q, k) fp32, indices (Q, k) int64, repaired pairs)."""
    if triton.cdiv(items.shape[0], CHUNK * chunks) * m < k:
        raise ValueError(f"the plan ({chunks} chunks, M={m}) leaves fewer than k={k} candidates per query")
    cand_s, cand_i = _candidates(queries, items, chunks, m)
    top_s, pos = cand_s.topk(k, dim=1)  # (Q, k) provisional
    top_i = cand_i.gather(1, pos).long()
    return _repair(queries, items, k, CHUNK * chunks, m, cand_s, top_s, top_i)


def exact_topk(queries: torch.Tensor, items: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """queries (Q, D), items (I, D) -> (scores (Q, k), indices (Q, k) int64), inner product, sorted descending.

    Scores come back in the queries' dtype like the reference's; they are accumulated in fp32. CPU tensors (outside
    the interpreter) and plans the kernel does not suit (see `plan`) take the reference.
    """
    if queries.dim() != 2 or items.dim() != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(f"expected queries (Q, D) and items (I, D), got {tuple(queries.shape)}, {tuple(items.shape)}")
    if queries.dtype != items.dtype or queries.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"queries and items must share a float32/bfloat16/float16 dtype: {queries.dtype}, {items.dtype}"
        )
    if not 1 <= k <= items.shape[0]:
        raise ValueError(f"k must be in 1..{items.shape[0]} (the number of items), got {k}")
    if items.shape[0] >= 2**31:
        raise ValueError("the kernel indexes items with int32: at most 2**31 - 1 items")
    chosen = plan(items.shape[0], k)
    on_device = (queries.is_cuda and items.is_cuda) or INTERPRETED  # compiled kernels need CUDA tensors
    if chosen is None or queries.shape[0] == 0 or not on_device:
        return exact_topk_reference(queries, items, k)
    scores, indices, _ = fused_topk(queries, items, k, *chosen)
    return scores.to(queries.dtype), indices
