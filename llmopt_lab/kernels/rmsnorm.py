"""Fused RMSNorm in Triton: one program normalises one row.

The unfused version reads x three times (square-mean, scale, weight multiply)
and launches several kernels; this one reads each row once into registers,
computes in float32 and writes once. Reference: :func:`reference.rmsnorm_ref`.
"""

from __future__ import annotations

import torch

from . import HAS_TRITON, can_launch, launch_scope
from .reference import rmsnorm_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, n_cols, x_row_stride, y_row_stride, eps,
                        BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        # cast back to the input dtype before the weight multiply, as the reference does
        y = (x * inv_rms).to(w.dtype) * w
        tl.store(y_ptr + row * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)

    COMPILE_SPECS = [
        dict(fn=_rmsnorm_kernel,
             signature={"x_ptr": f"*{t}", "w_ptr": f"*{t}", "y_ptr": f"*{t}", "n_cols": "i32",
                        "x_row_stride": "i32", "y_row_stride": "i32", "eps": "fp32",
                        "BLOCK": "constexpr"},
             constexprs={"BLOCK": 4096})
        for t in ("fp32", "fp16", "bf16")
    ]

MAX_COLS = 65536


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dimension with the fused Triton kernel.

    x: (..., N) float32/float16/bfloat16; weight: (N,) same dtype and device.
    Returns (..., N) in x's dtype. Falls back to the reference where no kernel
    can run (no Triton; tensors on a device the current Triton mode cannot use).
    Raises ValueError for mismatched shapes, dtypes or devices.
    """
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"rmsnorm: weight of shape {tuple(weight.shape)} does not match "
                         f"the last dimension of x {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"rmsnorm: x is {x.dtype} but weight is {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"rmsnorm: x is on {x.device} but weight on {weight.device}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"rmsnorm: unsupported dtype {x.dtype}")
    n = x.shape[-1]
    if n > MAX_COLS or not can_launch(x, weight):
        return rmsnorm_ref(x, weight, eps)
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty_like(x2)
    with launch_scope("rmsnorm"):
        _rmsnorm_kernel[(x2.shape[0],)](x2, weight, y, n, x2.stride(0), y.stride(0), eps,
                                         BLOCK=triton.next_power_of_2(n))
    return y.reshape(x.shape)
