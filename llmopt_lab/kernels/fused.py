"""Fused elementwise kernels of a decoder layer (lesson 09, operator fusion).

Between the matmuls of a Llama layer sit small memory-bound operations. In
eager PyTorch each is one or more kernels that read their inputs from HBM and
write their result back, only for the next kernel to read it again. Fusing
them keeps the intermediates in registers. For a row of N elements of b bytes:

* **residual add + RMSNorm** (:func:`add_rmsnorm`). Eager: the add reads x and
  the residual and writes the sum (3Nb), then RMSNorm reads the sum again for
  the square-mean, again to scale, casts and multiplies by the weight, each a
  separate elementwise kernel writing a temporary (in float32 for half inputs):
  some 6-8 launches and well over 10Nb of traffic. Fused: one launch that reads
  x and the residual once and writes the sum and the normalised row once
  (4Nb, plus the weight, which stays in cache).
* **rotary embedding of q and k** (:func:`rope_`). Eager ``apply_rope`` on q
  and on k: chunk, negate, cat (a new tensor), two multiplies, an add, per
  tensor: about 10 launches and several full-size temporaries. Fused: one
  launch for q and k together, each element read once and written once, in
  place (no new tensor at all), cos/sin read once per token for all heads.
* **SwiGLU** (:func:`swiglu`). Eager ``F.silu(gate) * up``: silu reads gate and
  writes a temporary, the multiply reads it and up and writes the result
  (5Ib for I elements). Fused: read gate and up, write the result (3Ib), one
  launch; with a fused gate/up projection it reads the (..., 2I) output directly,
  without slicing copies.

Each kernel has a plain-torch reference in :mod:`llmopt_lab.kernels.reference`
(:func:`add_rmsnorm_ref`, :func:`rope_ref`, :func:`swiglu_ref`); the wrappers
fall back to it where no kernel can run (see :func:`llmopt_lab.kernels.can_launch`).
These are inference kernels: no autograd.
"""

from __future__ import annotations

import torch

from . import HAS_TRITON, can_launch, launch_scope
from .reference import add_rmsnorm_ref, rope_ref, swiglu_ref

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: widest row add_rmsnorm keeps in one program; wider rows use the reference
MAX_COLS = 65536
#: elements of one rope_ tile (heads x half head dim), and of one swiglu block
_ROPE_TILE = 2048
_SWIGLU_BLOCK = 1024

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, n_cols, x_row_stride,
                            r_row_stride, y_row_stride, s_row_stride, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row * r_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        # round the sum to the input dtype, as eager x + residual does, and normalise that
        s = (x + r).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row * s_row_stride + cols, s, mask=mask)
        sf = s.to(tl.float32)
        inv_rms = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        # cast back to the input dtype before the weight multiply, as rmsnorm_ref does
        y = (sf * inv_rms).to(w.dtype) * w
        tl.store(y_ptr + row * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_heads(x_ptr, tok, tok_stride, head_stride, h0, n_heads, half, offs_d,
                    c1, c2, s1, s2, BLOCK_H: tl.constexpr):
        """Rotate heads h0 .. h0 + BLOCK_H - 1 (those < n_heads) of one token in place."""
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < n_heads)[:, None] & (offs_d < half)[None, :]
        p1 = x_ptr + tok * tok_stride + heads.to(tl.int64)[:, None] * head_stride + offs_d[None, :]
        p2 = p1 + half
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
        # x * cos + cat(-x2, x1) * sin, one half at a time
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(p1, o1.to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(p2, o2.to(x_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, n_q_heads, n_k_heads, half,
                     q_tok_stride, q_head_stride, k_tok_stride, k_head_stride,
                     cos_tok_stride, sin_tok_stride,
                     BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
        # grid (tokens, head blocks of q then head blocks of k)
        tok = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        offs_d = tl.arange(0, BLOCK_HALF)
        d_ok = offs_d < half
        cos_row = cos_ptr + tok * cos_tok_stride
        sin_row = sin_ptr + tok * sin_tok_stride
        c1 = tl.load(cos_row + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        c2 = tl.load(cos_row + half + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        s1 = tl.load(sin_row + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        s2 = tl.load(sin_row + half + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        n_q_blocks = tl.cdiv(n_q_heads, BLOCK_H)
        if hb < n_q_blocks:
            _rope_heads(q_ptr, tok, q_tok_stride, q_head_stride, hb * BLOCK_H, n_q_heads, half,
                        offs_d, c1, c2, s1, s2, BLOCK_H)
        else:
            _rope_heads(k_ptr, tok, k_tok_stride, k_head_stride, (hb - n_q_blocks) * BLOCK_H,
                        n_k_heads, half, offs_d, c1, c2, s1, s2, BLOCK_H)

    @triton.jit
    def _swiglu_kernel(g_ptr, u_ptr, y_ptr, n_cols, g_row_stride, u_row_stride, y_row_stride,
                       BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(g_ptr + row * g_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * u_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        # silu rounded to the output dtype before the product, as eager F.silu(g) * u does
        act = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + row * y_row_stride + cols, (act * u).to(y_ptr.dtype.element_ty), mask=mask)

    JIT_HELPERS = [_rope_heads]  # compiled within _rope_kernel

    _DT = ("fp32", "fp16", "bf16")
    COMPILE_SPECS = [
        dict(fn=_add_rmsnorm_kernel,
             signature={"x_ptr": f"*{t}", "r_ptr": f"*{t}", "w_ptr": f"*{t}", "y_ptr": f"*{t}",
                        "s_ptr": f"*{t}", "n_cols": "i32", "x_row_stride": "i32",
                        "r_row_stride": "i32", "y_row_stride": "i32", "s_row_stride": "i32",
                        "eps": "fp32", "BLOCK": "constexpr"},
             constexprs={"BLOCK": 4096})
        for t in _DT
    ] + [
        dict(fn=_rope_kernel,
             signature={"q_ptr": f"*{t}", "k_ptr": f"*{t}", "cos_ptr": f"*{c}", "sin_ptr": f"*{c}",
                        "n_q_heads": "i32", "n_k_heads": "i32", "half": "i32",
                        "q_tok_stride": "i32", "q_head_stride": "i32", "k_tok_stride": "i32",
                        "k_head_stride": "i32", "cos_tok_stride": "i32", "sin_tok_stride": "i32",
                        "BLOCK_H": "constexpr", "BLOCK_HALF": "constexpr"},
             constexprs={"BLOCK_H": 32, "BLOCK_HALF": 64})
        for t, c in [(t, t) for t in _DT] + [("fp16", "fp32"), ("bf16", "fp32")]
    ] + [
        dict(fn=_swiglu_kernel,
             signature={"g_ptr": f"*{t}", "u_ptr": f"*{t}", "y_ptr": f"*{t}", "n_cols": "i32",
                        "g_row_stride": "i32", "u_row_stride": "i32", "y_row_stride": "i32",
                        "BLOCK": "constexpr"},
             constexprs={"BLOCK": _SWIGLU_BLOCK})
        for t in _DT
    ]


def _check_dtype(fn: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{fn}: unsupported dtype {t.dtype} for {name} "
                         "(float32, float16 or bfloat16)")


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t as a 2-D (rows, n) tensor with unit stride along the last dimension."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add and RMSNorm in one kernel: one program per row.

    x, residual: (..., N), same shape, dtype (float32/float16/bfloat16) and
    device; weight: (N,), same dtype and device. Computes
    ``summed = x + residual`` (rounded to the input dtype, as eager torch) and
    ``normed = rmsnorm(summed, weight, eps)`` (float32 inside, as
    :func:`reference.rmsnorm_ref`). Not in place: returns new contiguous
    tensors (normed, summed), both (..., N) in x's dtype. Rows wider than
    MAX_COLS, or tensors no kernel can run on here, use
    :func:`reference.add_rmsnorm_ref`.
    Raises ValueError for mismatched shapes, dtypes or devices, or an
    unsupported dtype.
    """
    if x.shape != residual.shape:
        raise ValueError(f"add_rmsnorm: x {tuple(x.shape)} and residual {tuple(residual.shape)} "
                         "must have the same shape")
    if x.dim() < 1 or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"add_rmsnorm: weight of shape {tuple(weight.shape)} does not match "
                         f"the last dimension of x {tuple(x.shape)}")
    _check_dtype("add_rmsnorm", "x", x)
    if residual.dtype != x.dtype or weight.dtype != x.dtype:
        raise ValueError(f"add_rmsnorm: x is {x.dtype}, residual {residual.dtype} and weight "
                         f"{weight.dtype}; they must have the same dtype")
    if residual.device != x.device or weight.device != x.device:
        raise ValueError(f"add_rmsnorm: x is on {x.device}, residual on {residual.device} and "
                         f"weight on {weight.device}")
    n = x.shape[-1]
    if n > MAX_COLS or x.numel() == 0 or not can_launch(x, residual, weight):
        return add_rmsnorm_ref(x, residual, weight, eps)
    x2, r2 = _rows(x, n), _rows(residual, n)
    weight = weight.contiguous()  # the kernel reads it with unit stride
    normed = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(normed)
    with launch_scope("add_rmsnorm"):
        _add_rmsnorm_kernel[(x2.shape[0],)](x2, r2, weight, normed, summed, n, x2.stride(0),
                                             r2.stride(0), normed.stride(0), summed.stride(0), eps,
                                             BLOCK=triton.next_power_of_2(n))
    return normed.reshape(x.shape), summed.reshape(x.shape)


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
          sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of queries and keys, IN PLACE, in one launch.

    q: (N, Hq, D); k: (N, Hk, D); same dtype (float32/float16/bfloat16) and
    device, D even. Any token and head strides (views of a fused qkv output
    such as ``qkv[:, :Hq*D].view(N, Hq, D)`` are fine); the last dimension
    should have stride 1 (otherwise this falls back to the reference, still in
    place). cos, sin: (N, D) or (N, 1, D), same shape and float dtype as each
    other (q's dtype or float32). Halves convention of Llama/HF, as
    :func:`reference.rope_ref`: ``x * cos + cat(-x2, x1) * sin``, computed in
    float32 and rounded to q's dtype. q and k must not overlap in memory.
    Overwrites q and k and returns them. Where no kernel can run, computes
    :func:`reference.rope_ref` and copies the result into q and k.
    Raises ValueError for mismatched shapes, dtypes or devices, an odd head
    dimension or an unsupported dtype.
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"rope_: q {tuple(q.shape)} and k {tuple(k.shape)} must be (N, Hq, D) "
                         "and (N, Hk, D) with the same N and D")
    N, Hq, D = q.shape
    Hk = k.shape[1]
    if D % 2:
        raise ValueError(f"rope_: the head dimension must be even, got D={D} for q "
                         f"{tuple(q.shape)}")
    if cos.shape != sin.shape or tuple(cos.shape) not in ((N, D), (N, 1, D)):
        raise ValueError(f"rope_: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be "
                         f"({N}, {D}) or ({N}, 1, {D}) for q {tuple(q.shape)}")
    _check_dtype("rope_", "q", q)
    _check_dtype("rope_", "cos", cos)
    if k.dtype != q.dtype or sin.dtype != cos.dtype:
        raise ValueError(f"rope_: q is {q.dtype} and k {k.dtype}, cos is {cos.dtype} and sin "
                         f"{sin.dtype}; q and k (and cos and sin) must have the same dtype")
    if cos.dtype not in (q.dtype, torch.float32):
        raise ValueError(f"rope_: cos and sin are {cos.dtype}; they must be {q.dtype} (as q) "
                         "or torch.float32")
    if len({t.device for t in (q, k, cos, sin)}) != 1:
        raise ValueError(f"rope_: q is on {q.device}, k on {k.device}, cos on {cos.device} and "
                         f"sin on {sin.device}")
    if N == 0:
        return q, k
    # the head blocks run along grid axis 1, which CUDA caps at 65535
    if q.stride(-1) != 1 or k.stride(-1) != 1 or Hq + Hk > 65535 or not can_launch(q, k, cos, sin):
        q_rot, k_rot = rope_ref(q, k, cos, sin)
        q.copy_(q_rot)
        k.copy_(k_rot)
        return q, k
    if cos.dim() == 3:
        cos, sin = cos[:, 0], sin[:, 0]
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    half = D // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(Hq, Hk)), _ROPE_TILE // block_half))
    grid = (N, triton.cdiv(Hq, block_h) + triton.cdiv(Hk, block_h))
    with launch_scope("rope"):
        _rope_kernel[grid](q, k, cos, sin, Hq, Hk, half, q.stride(0), q.stride(1), k.stride(0),
                           k.stride(1), cos.stride(0), sin.stride(0),
                           BLOCK_H=block_h, BLOCK_HALF=block_half)
    return q, k


def swiglu(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU activation ``silu(gate) * up`` in one kernel.

    Two tensors: gate, up (..., I), same shape, dtype (float32/float16/
    bfloat16) and device. With ``up=None``: gate is the (..., 2I) output of a
    fused gate/up projection, its first half the gate and its second half up.
    silu in float32, rounded to the input dtype before the product (as eager
    ``F.silu(gate) * up``, :func:`reference.swiglu_ref`). Not in place: returns
    a new contiguous (..., I) tensor in the input dtype.
    Raises ValueError for mismatched shapes, dtypes or devices, an odd last
    dimension of a fused gate_up, or an unsupported dtype.
    """
    if gate.dim() < 1:
        raise ValueError(f"swiglu: gate must have at least one dimension, got {tuple(gate.shape)}")
    _check_dtype("swiglu", "gate", gate)
    if up is None:
        if gate.shape[-1] % 2:
            raise ValueError(f"swiglu: a fused gate_up {tuple(gate.shape)} needs an even last "
                             "dimension (gate and up halves)")
        n = gate.shape[-1] // 2
        out_shape = gate.shape[:-1] + (n,)
        if gate.numel() == 0 or not can_launch(gate):
            return swiglu_ref(gate[..., :n], gate[..., n:]).contiguous()
        gu = _rows(gate, 2 * n)
        g2, u2 = gu[:, :n], gu[:, n:]
    else:
        if up.shape != gate.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must "
                             "have the same shape")
        if up.dtype != gate.dtype:
            raise ValueError(f"swiglu: gate is {gate.dtype} but up is {up.dtype}")
        if up.device != gate.device:
            raise ValueError(f"swiglu: gate is on {gate.device} but up on {up.device}")
        n = gate.shape[-1]
        out_shape = gate.shape
        if gate.numel() == 0 or not can_launch(gate, up):
            return swiglu_ref(gate, up).contiguous()
        g2, u2 = _rows(gate, n), _rows(up, n)
    y = torch.empty((g2.shape[0], n), dtype=gate.dtype, device=gate.device)
    block = min(triton.next_power_of_2(n), _SWIGLU_BLOCK)
    grid = (g2.shape[0], triton.cdiv(n, block))
    with launch_scope("swiglu"):
        _swiglu_kernel[grid](g2, u2, y, n, g2.stride(0), u2.stride(0), y.stride(0), BLOCK=block)
    return y.reshape(out_shape)
