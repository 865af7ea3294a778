"""Triton kernels vs their torch references on a GPU (issue #3 item 5): one JSON line.

  - similarity: sampled + hard-negative logits, forward + backward, B=4096, N=1024, H=4096 hard negatives, D=64;
    "ratio" = reference time / kernel time (> 1: the kernel is faster).
  - top-k: k=100 over 10M x 64 bf16 items for 256 queries, fused kernel vs torch matmul + topk and, when faiss has
    GPU support, faiss GpuIndexFlatIP (fp16 storage, faiss has no bf16 flat index); "hbm_fraction" = the time to read
    the items once at the measured copy bandwidth / the kernel's time.

    .venv/bin/python bench/kernels.py [--dtype bf16|fp32] [--items 10000000] [--repeats 20]

Without CUDA it says so on stderr, runs a small correctness pass of both kernels in Triton's CPU interpreter and
exits 0 when it passes (1 when it does not); nothing is timed there.
"""

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as `python bench/kernels.py`: the repo's packages come first

CPU_CHECK = """
import torch
from models.kernels.sampled_similarity import sampled_similarity
from models.kernels.topk import exact_topk, exact_topk_reference
from models.similarity import similarity
torch.manual_seed(0)
u = torch.randn(70, 40, requires_grad=True); v = torch.randn(70 + 30 + 50, 40, requires_grad=True)
idx = torch.stack([torch.arange(50) % 70, torch.arange(50) // 70 * 2], 1)
out = sampled_similarity(u, v, idx); ref = similarity(u, v, in_batch=False, hard_neg_indices=idx)
g = torch.randn_like(ref)
ga = torch.autograd.grad(out, (u, v), g); gb = torch.autograd.grad(ref, (u, v), g)
sim_err = max((out - ref).abs().max().item(), *((a - b).abs().max().item() for a, b in zip(ga, gb)))
q = torch.randn(4, 40); items = torch.randn(2000, 40)
s, i = exact_topk(q, items, 10); rs, ri = exact_topk_reference(q, items, 10)
print(sim_err < 1e-4 and torch.equal(i, ri) and (s - rs).abs().max().item() < 1e-4)
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--items", type=int, default=10_000_000)
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--repeats", type=int, default=20)
    return p.parse_args(argv)


def cuda_time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds per call, CUDA events, after warm-up (the first calls compile the kernels)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(repeats: int) -> float:
    """Achievable HBM bytes/s from a 2 GiB device-to-device copy (read + write): the bound the top-k is held to."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() / t


def bench_similarity(dtype: torch.dtype, repeats: int) -> dict[str, float]:
    from models.kernels.sampled_similarity import sampled_similarity
    from models.similarity import hard_block

    b, n, h, d = 4096, 1024, 4096, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(b, d, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    v = torch.randn(b + n + h, d, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    idx = torch.stack([torch.arange(h) % b, torch.arange(h) // b], dim=1).cuda()  # one hard negative per user
    grad = torch.randn(b, 1 + n + 1, device="cuda", dtype=dtype, generator=gen)

    def reference() -> None:  # models.similarity's torch path, spelled out so the dispatch cannot pick the kernel
        pos = (u * v[:b]).sum(-1, keepdim=True)
        neg = u @ v[b : b + n].T
        out = torch.cat([pos, neg, hard_block(u, v[b + n :], idx)], dim=1)
        torch.autograd.grad(out, (u, v), grad)

    def kernel() -> None:
        torch.autograd.grad(sampled_similarity(u, v, idx), (u, v), grad)

    t_ref, t_kernel = cuda_time(reference, repeats), cuda_time(kernel, repeats)
    return {"sim_ref_ms": t_ref * 1e3, "sim_kernel_ms": t_kernel * 1e3, "ratio": t_ref / t_kernel}


def bench_topk(dtype: torch.dtype, n_items: int, n_q: int, k: int, repeats: int) -> dict[str, float | None]:
    from models.kernels.topk import exact_topk, exact_topk_reference, plan

    d = 64
    gen = torch.Generator(device="cuda").manual_seed(1)
    items = torch.randn(n_items, d, device="cuda", dtype=dtype, generator=gen)
    q = torch.randn(n_q, d, device="cuda", dtype=dtype, generator=gen)
    s, _ = exact_topk(q, items, k)
    rs, _ = exact_topk_reference(q, items, k)
    max_err = (s.float() - rs.float()).abs().max().item()
    t_kernel = cuda_time(lambda: exact_topk(q, items, k), repeats)
    try:
        t_ref: float | None = cuda_time(lambda: exact_topk_reference(q, items, k), repeats)
    except torch.OutOfMemoryError:
        t_ref = None
    bandwidth = copy_bandwidth(repeats)
    bound = items.numel() * items.element_size() / bandwidth  # reading every item once
    out: dict[str, float | None] = {
        "topk_plan": str(plan(n_items, k)),
        "topk_kernel_ms": t_kernel * 1e3,
        "topk_ref_ms": None if t_ref is None else t_ref * 1e3,
        "topk_ratio_vs_ref": None if t_ref is None else t_ref / t_kernel,
        "topk_max_score_err": max_err,
        "copy_bandwidth_gbs": bandwidth / 1e9,
        "hbm_fraction": bound / t_kernel,
        "faiss_ms": None,
        "topk_ratio_vs_faiss": None,
    }
    try:
        import faiss

        if hasattr(faiss, "StandardGpuResources"):
            res = faiss.StandardGpuResources()
            cfg = faiss.GpuIndexFlatConfig()
            cfg.useFloat16 = dtype != torch.float32
            index = faiss.GpuIndexFlatIP(res, d, cfg)
            index.add(items.float().cpu().numpy())
            qn = q.float().cpu().numpy()
            # faiss takes host queries here, so this includes the (256 x 64) upload: small next to the scan
            t_faiss = cuda_time(lambda: index.search(qn, k), repeats)
            out["faiss_ms"] = t_faiss * 1e3
            out["topk_ratio_vs_faiss"] = t_faiss / t_kernel
    except ImportError:
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device, nothing to time; running the CPU interpreter check", file=sys.stderr)
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run([sys.executable, "-c", CPU_CHECK], cwd=REPO, env=env, capture_output=True, text=True)
        correct = proc.returncode == 0 and proc.stdout.strip().endswith("True")
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
        print(json.dumps({"device": "cpu", "ratio": None, "skipped": "no CUDA device", "interpreter_correct": correct}))
        return 0 if correct else 1
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    result: dict[str, object] = {"device": torch.cuda.get_device_name(), "dtype": args.dtype}
    result.update(bench_similarity(dtype, args.repeats))
    result.update(bench_topk(dtype, args.items, args.queries, args.k, args.repeats))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
