"""Triton kernels for the GPU hot paths of DESIGN §3: sampled + hard-negative similarity and fused score + top-k.

The kernel modules import triton at import time, so nothing here imports them: triton is a `dev` extra and a CPU
install without it must still import `models`. Callers check `triton_available()` first and import
`models.kernels.sampled_similarity` / `models.kernels.topk` lazily.

Triton decides between compiling and interpreting when it is imported and when a kernel is decorated (both read
TRITON_INTERPRET), and one process cannot do both; tests/test_kernels.py therefore runs its interpreter checks in a
child process, so that a GPU run of the same pytest session still gets compiled kernels.
"""

import importlib.util
import os

import torch


def triton_available() -> bool:
    """True when triton imports and can run a kernel: on a CUDA device, or in its interpreter (TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken triton install (e.g. missing libs) counts as absent, not as a crash at dispatch
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"
