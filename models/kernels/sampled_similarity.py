"""Triton sampled + hard-negative similarity (DESIGN §3), forward and backward; `models.similarity` is the reference.

u (B, D) user vectors, v (B + N + H, D) item rows [positives; sampled negatives; hard negatives]. The kernels write
straight into the logits (B, 1 + N + S):

    col 0             pos[i]                = <u[i], v[i]>
    cols 1 .. N       neg[i, n]             = <u[i], v[B + n]>
    cols 1 + N ..     hard[row_j, slot_j]   = <u[row_j], v[B + N + j]>, every other cell finfo(dtype).min

The torch reference builds pos, neg and a dense (B, S) hard block and concatenates them (three intermediates plus a
copy); here each program stores its tile at its final column offset, and the empty hard cells are a fill of the
output's own tail before the hard scatter. Empty cells get no gradient simply because the backward only reads the
grad cells that a hard negative maps to.

Kernels (BM x BN output tiles, a BK loop over D so that any D (16..256, not only powers of two) is a masked loop, and
every product is accumulated in fp32 whatever the storage dtype):
  forward   _fwd_dense_kernel  grid (B/BM, 1 + N/BN): column-block 0 is the positive column (row-wise dot), the others
                               are u_tile @ v_neg_tile.T on tensor cores.
            _fwd_hard_kernel   grid (H/BH): gathers u[row_j], dots with v[B+N+j], stores at (row_j, 1+N+slot_j).
  backward  _bwd_u_kernel      grid (B/BM, D/BD): dU = g_pos * v_pos + G_neg @ V_neg, and dV_pos = g_pos * u.
            _bwd_vneg_kernel   grid (N/BN, D/BD): dV_neg = G_neg.T @ U.
            _bwd_hard_kernel   grid (H/BH, D/BD): dV_hard[j] = g_j * u[row_j], dU[row_j] += g_j * v_hard[j] (atomic:
                               a user may own several hard negatives). Launched after _bwd_u_kernel on the same stream.
dU accumulates in an fp32 buffer (the atomics need one) and is cast to u's dtype at the end.

(row, slot) pairs are assumed distinct, as the sampler produces them; with duplicates the reference keeps one
write (index_put) while the forward here keeps an arbitrary one and the backward would credit both.
"""

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

# Tile sizes. 64 x 64 output tiles with a 64-wide D step keep the fp32 accumulator at 16 KiB per program: the sampled
# shapes (B 4096, N 1024, D 64) are small matmuls where occupancy matters more than per-tile reuse.
BM = 64
BN = 64
BH = 64
BK_MAX = 64


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32. UPCAST works around Triton's CPU interpreter, whose tl.dot multiplies bf16 operands as
    their raw uint16 bits: the interpreter gets fp32 operands (bf16 x bf16 products are exact in fp32, so the result
    only differs by summation order); compiled kernels keep the native bf16 tensor-core dot."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _fwd_dense_kernel(
    u_ptr, v_ptr, out_ptr,
    B, N, D,
    su0, su1, sv0, sv1, so0, so1,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)  # (BM,) user rows
    m_ok = rm < B
    rm64 = rm.to(tl.int64)
    if pid_n == 0:
        # positive column: pos[i] = sum_d u[i, d] * v[i, d]
        pos = tl.zeros((BM,), dtype=tl.float32)
        for k0 in range(0, D, BK):
            rk = k0 + tl.arange(0, BK)
            mk = m_ok[:, None] & (rk[None, :] < D)
            uu = tl.load(u_ptr + rm64[:, None] * su0 + rk[None, :] * su1, mask=mk, other=0.0)  # (BM, BK)
            vv = tl.load(v_ptr + rm64[:, None] * sv0 + rk[None, :] * sv1, mask=mk, other=0.0)  # (BM, BK)
            pos += tl.sum(uu.to(tl.float32) * vv.to(tl.float32), axis=1)
        tl.store(out_ptr + rm64 * so0, pos.to(out_ptr.dtype.element_ty), mask=m_ok)
    else:
        # sampled negatives: neg[i, n] = <u[i], v[B + n]>, stored at column 1 + n
        rn = (pid_n - 1) * BN + tl.arange(0, BN)  # (BN,) negative index
        n_ok = rn < N
        rv64 = (B + rn).to(tl.int64)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, D, BK):
            rk = k0 + tl.arange(0, BK)
            k_ok = rk < D
            uu = tl.load(u_ptr + rm64[:, None] * su0 + rk[None, :] * su1, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            vt = tl.load(v_ptr + rv64[None, :] * sv0 + rk[:, None] * sv1, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(uu, vt, acc, PRECISION, UPCAST)  # (BM, BK) @ (BK, BN)
        cols = (1 + rn).to(tl.int64)
        tl.store(
            out_ptr + rm64[:, None] * so0 + cols[None, :] * so1,
            acc.to(out_ptr.dtype.element_ty),
            mask=m_ok[:, None] & n_ok[None, :],
        )


@triton.jit
def _fwd_hard_kernel(
    u_ptr, v_ptr, idx_ptr, out_ptr,
    H, D, hard0, col0,
    su0, su1, sv0, sv1, si0, si1, so0, so1,
    BH: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    # hard[row_j, slot_j] = <u[row_j], v[hard0 + j]>, stored at column col0 + slot_j (hard0 = B + N, col0 = 1 + N)
    rj = tl.program_id(0) * BH + tl.arange(0, BH)  # (BH,) hard negative index
    j_ok = rj < H
    rj64 = rj.to(tl.int64)
    row = tl.load(idx_ptr + rj64 * si0, mask=j_ok, other=0).to(tl.int64)  # (BH,)
    slot = tl.load(idx_ptr + rj64 * si0 + si1, mask=j_ok, other=0).to(tl.int64)  # (BH,)
    acc = tl.zeros((BH,), dtype=tl.float32)
    for k0 in range(0, D, BK):
        rk = k0 + tl.arange(0, BK)
        mk = j_ok[:, None] & (rk[None, :] < D)
        uu = tl.load(u_ptr + row[:, None] * su0 + rk[None, :] * su1, mask=mk, other=0.0)  # (BH, BK) gathered users
        hh = tl.load(v_ptr + (hard0 + rj64)[:, None] * sv0 + rk[None, :] * sv1, mask=mk, other=0.0)  # (BH, BK)
        acc += tl.sum(uu.to(tl.float32) * hh.to(tl.float32), axis=1)
    tl.store(out_ptr + row * so0 + (col0 + slot) * so1, acc.to(out_ptr.dtype.element_ty), mask=j_ok)


@triton.jit
def _bwd_u_kernel(
    g_ptr, u_ptr, v_ptr, du_ptr, dv_ptr,
    B, N, D,
    sg0, sg1, su0, su1, sv0, sv1, sdu0, sdv0,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # dU[i] = G[i, 0] * v[i] + sum_n G[i, 1 + n] * v[B + n];  dV[i] = G[i, 0] * u[i]
    rm = tl.program_id(0) * BM + tl.arange(0, BM)  # (BM,)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)  # (BD,) this program's slice of D
    m_ok = rm < B
    d_ok = rd < D
    md = m_ok[:, None] & d_ok[None, :]
    rm64 = rm.to(tl.int64)
    g0 = tl.load(g_ptr + rm64 * sg0, mask=m_ok, other=0.0).to(tl.float32)  # (BM,)
    uu = tl.load(u_ptr + rm64[:, None] * su0 + rd[None, :] * su1, mask=md, other=0.0).to(tl.float32)  # (BM, BD)
    vp = tl.load(v_ptr + rm64[:, None] * sv0 + rd[None, :] * sv1, mask=md, other=0.0).to(tl.float32)  # (BM, BD)
    tl.store(dv_ptr + rm64[:, None] * sdv0 + rd[None, :], (g0[:, None] * uu).to(dv_ptr.dtype.element_ty), mask=md)
    acc = g0[:, None] * vp  # (BM, BD) fp32
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        n_ok = rn < N
        g = tl.load(
            g_ptr + rm64[:, None] * sg0 + (1 + rn).to(tl.int64)[None, :] * sg1,
            mask=m_ok[:, None] & n_ok[None, :],
            other=0.0,
        )  # (BM, BN)
        vn = tl.load(
            v_ptr + (B + rn).to(tl.int64)[:, None] * sv0 + rd[None, :] * sv1,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BN, BD)
        acc = _mma(g.to(vn.dtype), vn, acc, PRECISION, UPCAST)  # (BM, BN) @ (BN, BD)
    tl.store(du_ptr + rm64[:, None] * sdu0 + rd[None, :], acc, mask=md)


@triton.jit
def _bwd_vneg_kernel(
    g_ptr, u_ptr, dv_ptr,
    B, N, D,
    sg0, sg1, su0, su1, sdv0,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # dV[B + n] = sum_i G[i, 1 + n] * u[i]
    rn = tl.program_id(0) * BN + tl.arange(0, BN)  # (BN,)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)  # (BD,)
    n_ok = rn < N
    d_ok = rd < D
    cols = (1 + rn).to(tl.int64)
    acc = tl.zeros((BN, BD), dtype=tl.float32)
    for m0 in range(0, B, BM):
        rm = m0 + tl.arange(0, BM)
        m_ok = rm < B
        rm64 = rm.to(tl.int64)
        gt = tl.load(g_ptr + rm64[None, :] * sg0 + cols[:, None] * sg1, mask=n_ok[:, None] & m_ok[None, :], other=0.0)
        uu = tl.load(u_ptr + rm64[:, None] * su0 + rd[None, :] * su1, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _mma(gt.to(uu.dtype), uu, acc, PRECISION, UPCAST)  # (BN, BM) @ (BM, BD)
    rv64 = (B + rn).to(tl.int64)
    tl.store(
        dv_ptr + rv64[:, None] * sdv0 + rd[None, :],
        acc.to(dv_ptr.dtype.element_ty),
        mask=n_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _bwd_hard_kernel(
    g_ptr, u_ptr, v_ptr, idx_ptr, du_ptr, dv_ptr,
    H, D, hard0, col0,
    sg0, sg1, su0, su1, sv0, sv1, si0, si1, sdu0, sdv0,
    BH: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    # g_j = G[row_j, col0 + slot_j];  dV[hard0 + j] = g_j * u[row_j];  dU[row_j] += g_j * v[hard0 + j]
    rj = tl.program_id(0) * BH + tl.arange(0, BH)  # (BH,)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)  # (BD,)
    j_ok = rj < H
    md = j_ok[:, None] & (rd[None, :] < D)
    rj64 = rj.to(tl.int64)
    row = tl.load(idx_ptr + rj64 * si0, mask=j_ok, other=0).to(tl.int64)
    slot = tl.load(idx_ptr + rj64 * si0 + si1, mask=j_ok, other=0).to(tl.int64)
    g = tl.load(g_ptr + row * sg0 + (col0 + slot) * sg1, mask=j_ok, other=0.0).to(tl.float32)  # (BH,)
    uu = tl.load(u_ptr + row[:, None] * su0 + rd[None, :] * su1, mask=md, other=0.0).to(tl.float32)  # (BH, BD)
    hh = tl.load(v_ptr + (hard0 + rj64)[:, None] * sv0 + rd[None, :] * sv1, mask=md, other=0.0).to(tl.float32)
    tl.store(
        dv_ptr + (hard0 + rj64)[:, None] * sdv0 + rd[None, :], (g[:, None] * uu).to(dv_ptr.dtype.element_ty), mask=md
    )
    tl.atomic_add(du_ptr + row[:, None] * sdu0 + rd[None, :], g[:, None] * hh, mask=md)


# The launchers read this to pick the interpreter workaround in _mma; it follows how the kernels were decorated
# (TRITON_INTERPRET at import time), not the current environment.
INTERPRETED = not isinstance(_fwd_dense_kernel, JITFunction)


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's matmul setting (TF32 only when torch would use it), so the kernel matches the
    reference it replaces; for bf16 the value is unused."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _bk(d: int) -> int:
    return min(BK_MAX, max(16, triton.next_power_of_2(d)))


def _check(u: torch.Tensor, v: torch.Tensor, hard_neg_indices: torch.Tensor | None) -> None:
    if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1]:
        raise ValueError(f"expected u (B, D) and v (B + N + H, D), got {tuple(u.shape)} and {tuple(v.shape)}")
    if u.dtype != v.dtype or u.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"u and v must share a float32/bfloat16/float16 dtype, got {u.dtype} and {v.dtype}")
    if u.device != v.device:
        raise ValueError(f"u and v are on different devices: {u.device}, {v.device}")
    h = 0 if hard_neg_indices is None else hard_neg_indices.shape[0]
    if v.shape[0] - h < u.shape[0]:
        raise ValueError(f"v has {v.shape[0]} rows: fewer than B={u.shape[0]} positives plus H={h} hard negatives")
    if hard_neg_indices is not None and (hard_neg_indices.dim() != 2 or hard_neg_indices.shape[1] != 2):
        raise ValueError(f"hard_neg_indices must be (H, 2) = (row, slot), got {tuple(hard_neg_indices.shape)}")


class SampledSimilarity(torch.autograd.Function):
    """Autograd wrapper: saves u, v and the indices (no logits), the backward recomputes nothing but reads G."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, v: torch.Tensor, hard_neg_indices: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        b, d = u.shape
        h = 0 if hard_neg_indices is None else hard_neg_indices.shape[0]
        n = v.shape[0] - b - h
        s = int(hard_neg_indices[:, 1].max().item()) + 1 if h else 0  # one host sync, as in the reference
        out = torch.empty(b, 1 + n + s, dtype=u.dtype, device=u.device)  # (B, 1 + N + S)
        prec, bk = _precision(u.dtype), _bk(d)
        if b:
            grid = (triton.cdiv(b, BM), 1 + triton.cdiv(n, BN))
            _fwd_dense_kernel[grid](
                u, v, out, b, n, d, *u.stride(), *v.stride(), *out.stride(),
                BM=BM, BN=BN, BK=bk, PRECISION=prec, UPCAST=INTERPRETED,
            )  # fmt: skip
        if h:
            assert hard_neg_indices is not None
            out[:, 1 + n :].fill_(torch.finfo(u.dtype).min)  # empty hard cells, overwritten where a negative lands
            _fwd_hard_kernel[(triton.cdiv(h, BH),)](
                u, v, hard_neg_indices, out, h, d, b + n, 1 + n,
                *u.stride(), *v.stride(), *hard_neg_indices.stride(), *out.stride(),
                BH=BH, BK=bk,
            )  # fmt: skip
        ctx.save_for_backward(u, v, hard_neg_indices if h else None)
        ctx.dims = (b, n, h, d)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # type: ignore[override]
        u, v, idx = ctx.saved_tensors
        b, n, h, d = ctx.dims
        grad = grad.to(u.dtype)  # G (B, 1 + N + S); strides are passed, so an expanded grad needs no copy
        du = torch.empty(b, d, dtype=torch.float32, device=u.device)  # fp32: the hard kernel adds into it atomically
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)  # (B + N + H, D)
        prec = _precision(u.dtype)
        bd = _bk(d)
        if b:
            _bwd_u_kernel[(triton.cdiv(b, BM), triton.cdiv(d, bd))](
                grad, u, v, du, dv, b, n, d,
                *grad.stride(), *u.stride(), *v.stride(), du.stride(0), dv.stride(0),
                BM=BM, BN=BN, BD=bd, PRECISION=prec, UPCAST=INTERPRETED,
            )  # fmt: skip
        if n:
            if b:
                _bwd_vneg_kernel[(triton.cdiv(n, BN), triton.cdiv(d, bd))](
                    grad, u, dv, b, n, d,
                    *grad.stride(), *u.stride(), dv.stride(0),
                    BM=BM, BN=BN, BD=bd, PRECISION=prec, UPCAST=INTERPRETED,
                )  # fmt: skip
            else:
                dv[:n].zero_()
        if h:
            _bwd_hard_kernel[(triton.cdiv(h, BH), triton.cdiv(d, bd))](
                grad, u, v, idx, du, dv, h, d, b + n, 1 + n,
                *grad.stride(), *u.stride(), *v.stride(), *idx.stride(), du.stride(0), dv.stride(0),
                BH=BH, BD=bd,
            )  # fmt: skip
        grad_u = du.to(u.dtype) if ctx.needs_input_grad[0] else None
        grad_v = dv if ctx.needs_input_grad[1] else None
        return grad_u, grad_v, None


def sampled_similarity(u: torch.Tensor, v: torch.Tensor, hard_neg_indices: torch.Tensor | None = None) -> torch.Tensor:
    """u (B, D), v (B + N + H, D), hard_neg_indices (H, 2) or None -> logits (B, 1 + N + S), positive in column 0.

    Same values and gradients as `models.similarity.similarity(u, v, in_batch=False, hard_neg_indices=...)`, with
    fp32 accumulation for bf16/fp16 inputs (the reference's `(u * v).sum` rounds each product to the input dtype).
    """
    _check(u, v, hard_neg_indices)
    if hard_neg_indices is not None:
        if hard_neg_indices.dtype.is_floating_point or hard_neg_indices.dtype == torch.bool:
            raise ValueError(f"hard_neg_indices must be an integer tensor, got {hard_neg_indices.dtype}")
        # H = 0 adds no hard block, as in the reference; torch indexing accepts CPU indices, the kernel needs u's device
        hard_neg_indices = None if hard_neg_indices.shape[0] == 0 else hard_neg_indices.to(u.device)
    return SampledSimilarity.apply(u, v, hard_neg_indices)
