"""Matrix multiplies with quantized weights that dequantize inside the kernel.

(Over 400 lines: three kernel families share one jitted epilogue, one config
table and one wrapper pattern; apart they would each repeat them.)

``y = x @ W.T (+ bias)`` where W (N out x K in) is stored in one of the formats
of :mod:`llmopt_lab.kernels.reference` and x is float32, float16 or bfloat16.
The weights are never written out in a float format: each tile is read in its
packed form, turned into numbers in registers and used at once. That is the
whole point at decode time, where a matmul is bound by the bytes of weights it
reads: int8 reads half the bytes of bf16, int4 about a quarter.

The weight-only formats are stored K-major (W transposed: (K, N) int8;
(K // 2, N) bytes of two int4 codes), with int4 scales and zero points as
(K // G, N). Two paths, picked by the number of rows M of x (tokens):

* **GEMV** (M <= :data:`GEMV_MAX_ROWS`, decode; N a multiple of 4). The weights
  are read as int32 words, each holding 4 neighbouring output features (int8)
  or 4 features x 2 inputs (int4). A program owns ``block_w`` words (4 x
  block_w outputs) of a chunk of K; each thread loads 16-byte vectors of 4
  words for every k row of its chunk, so the x value of a row serves 4 words
  and the sum over k never leaves the thread. Codes become floats with a bit
  trick instead of the slow int->float conversion instruction: placed in the
  top mantissa bits of 1.0, an int4 code q reads as ``1 + q / 16`` (int8, sign
  bit flipped: ``1 + (q + 128) / 256``), so one shift, one mask-and-or and
  one FMA handle a weight, and the offsets and zero points are taken out once
  per group: ``sum x (q - z) = 16 sum x f - (16 + z) sum x``. Scales are
  applied once per group (int4) or once at the end (int8). No tensor cores:
  M = 1 could not use them. When N gives too few programs to fill the GPU, K
  is split into ``split_k`` chunks (whole groups for int4) whose float32
  partial sums :func:`_splitk_reduce_kernel` adds (plus the bias) and casts.
* **GEMM** (prefill): tiles of (BLOCK_M x BLOCK_K) activations and (BLOCK_K x
  BLOCK_N) weights meet in ``tl.dot`` (tensor cores), accumulated in float32,
  also with an optional split-K for small M. For int4 each K tile lies inside
  one group (BLOCK_K divides the group size): the tile's codes minus its zero
  points are exact small integers in any float dtype, and the group's scale
  multiplies the (BLOCK_M x BLOCK_N) partial product once. The packed bytes
  are never re-interleaved: x is split into even and odd columns instead,
  ``x @ W.T = x[:, 0::2] @ W_low + x[:, 1::2] @ W_high``.

:func:`w8a8_matmul` is the W8A8 path (SmoothQuant): int8 weights (N, K),
activations quantized per token inside the kernel (a first pass over the row
strip finds each row's absmax), int8 x int8 products accumulated in int32 by
``tl.dot``, rescaled by the row and channel scales at the end.

References: :func:`reference.int8_matmul_ref`, :func:`reference.int4_matmul_ref`,
:func:`reference.w8a8_matmul_ref`. Every wrapper checks shapes, dtypes and
devices with a clear ValueError and falls back to the reference where no
kernel can run (see :func:`llmopt_lab.kernels.can_launch`).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from . import HAS_TRITON, INTERPRETED, can_launch
from .reference import int4_matmul_ref, int8_matmul_ref, w8a8_matmul_ref

#: group sizes of the int4 format the kernels take
GROUP_SIZES = (32, 64, 128, 256)
#: at most this many rows (tokens) take the GEMV path by default
GEMV_MAX_ROWS = 4
PATHS = ("auto", "gemv", "gemm")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if HAS_TRITON:
    import triton
    import triton.language as tl

    # ------------------------------------------------------------------ GEMV
    # Weights are K-major and read as int32 words: word [k, w] holds the bytes of
    # output columns 4w .. 4w+3 ("lanes" 0..3). A thread loads 16-byte vectors
    # along N and every row k of its tile, so one value of x serves 4 words,
    # and the sum over k stays inside the thread (no shuffles in the loop).
    #
    # Codes become floats without an int->float conversion instruction (a slow
    # one on NVIDIA GPUs): shifted into the top mantissa bits of 1.0 they read as
    #   int4: f = 1 + q / 16        -> q = 16 (f - 1)
    #   int8: f = 1 + (q + 128)/256 -> q = 256 f - 384   (q's sign bit flipped)
    # so a group's sum_k x_k (q_k - z) = 16 sum_k x_k f_k - (16 + z) sum_k x_k:
    # one shift, one mask-and-or and one FMA per weight.

    @triton.jit
    def _store_lanes(Y, BIAS, acc0, acc1, acc2, acc3, offs_m, cols, w_ok, M, N, pid_k,
                     HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr):
        # The GEMV epilogue: lane b's (BLOCK_M, BLOCK_W) sums are output columns
        # cols + b. Plus bias and cast to Y's dtype; or, with PARTIAL, float32
        # partial sums (SPLIT_K, M, N) at split pid_k, added by _splitk_reduce_kernel.
        out_mask = (offs_m[:, None] < M) & w_ok[None, :]
        if not PARTIAL:
            out = Y + offs_m[:, None] * N + cols[None, :]
            if HAS_BIAS:
                acc0 += tl.load(BIAS + cols, mask=w_ok, other=0.0).to(tl.float32)[None, :]
                acc1 += tl.load(BIAS + cols + 1, mask=w_ok, other=0.0).to(tl.float32)[None, :]
                acc2 += tl.load(BIAS + cols + 2, mask=w_ok, other=0.0).to(tl.float32)[None, :]
                acc3 += tl.load(BIAS + cols + 3, mask=w_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out, acc0.to(Y.dtype.element_ty), mask=out_mask)
            tl.store(out + 1, acc1.to(Y.dtype.element_ty), mask=out_mask)
            tl.store(out + 2, acc2.to(Y.dtype.element_ty), mask=out_mask)
            tl.store(out + 3, acc3.to(Y.dtype.element_ty), mask=out_mask)
        else:
            out = Y + (pid_k * M + offs_m[:, None]) * N + cols[None, :]
            tl.store(out, acc0, mask=out_mask)
            tl.store(out + 1, acc1, mask=out_mask)
            tl.store(out + 2, acc2, mask=out_mask)
            tl.store(out + 3, acc3, mask=out_mask)

    @triton.jit
    def _int4_gemv_kernel(X, WP, S, Z, BIAS, Y, M, N, K, stride_xm, stride_wk, G_PER_SPLIT,
                          GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, ROWS: tl.constexpr):
        # WP: (K // 2, N // 4) int32; byte lane b of word [j, w]: column 4w + b, codes of
        # k = 2j (low nibble) and 2j + 1 (high nibble). S, Z: (K // GROUP, N).
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_w = pid_n * BLOCK_W + tl.arange(0, BLOCK_W)
        offs_r = tl.arange(0, ROWS)
        offs_m = tl.arange(0, BLOCK_M)
        w_ok = offs_w < N // 4
        cols = 4 * offs_w
        acc0 = tl.zeros((BLOCK_M, BLOCK_W), tl.float32)
        acc1 = tl.zeros((BLOCK_M, BLOCK_W), tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_W), tl.float32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_W), tl.float32)
        g_start = pid_k * G_PER_SPLIT
        g_end = tl.minimum(g_start + G_PER_SPLIT, K // GROUP)
        for g in range(g_start, g_end):
            if BLOCK_M == 1:  # decode: accumulate (ROWS, BLOCK_W) per lane, reduce once per group
                a0 = tl.zeros((ROWS, BLOCK_W), tl.float32)
                a1 = tl.zeros((ROWS, BLOCK_W), tl.float32)
                a2 = tl.zeros((ROWS, BLOCK_W), tl.float32)
                a3 = tl.zeros((ROWS, BLOCK_W), tl.float32)
                xs = tl.zeros((ROWS,), tl.float32)
                for j0 in range(0, GROUP // 2, ROWS):
                    j = g * (GROUP // 2) + j0 + offs_r
                    w = tl.load(WP + j[:, None].to(tl.int64) * stride_wk + offs_w[None, :],
                                mask=w_ok[None, :], other=0)
                    xe = tl.load(X + 2 * j).to(tl.float32)[:, None]
                    xo = tl.load(X + 2 * j + 1).to(tl.float32)[:, None]
                    xs += tl.sum(xe + xo, axis=1)
                    a0 = a0 + (((w << 19) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True) * xe
                    a0 = a0 + (((w << 15) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True) * xo
                    a1 = a1 + (((w << 11) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True) * xe
                    a1 = a1 + (((w << 7) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True) * xo
                    a2 = a2 + (((w << 3) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True) * xe
                    a2 = a2 + (((w >> 1) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True) * xo
                    a3 = a3 + (((w >> 5) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True) * xe
                    a3 = a3 + (((w >> 9) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True) * xo
                gs0 = tl.sum(a0, axis=0)[None, :]
                gs1 = tl.sum(a1, axis=0)[None, :]
                gs2 = tl.sum(a2, axis=0)[None, :]
                gs3 = tl.sum(a3, axis=0)[None, :]
                gx = tl.sum(xs, axis=0)
            else:  # a few rows: each tile's per-row sums, routed to row m's accumulators
                gs0 = tl.zeros((BLOCK_M, BLOCK_W), tl.float32)
                gs1 = tl.zeros((BLOCK_M, BLOCK_W), tl.float32)
                gs2 = tl.zeros((BLOCK_M, BLOCK_W), tl.float32)
                gs3 = tl.zeros((BLOCK_M, BLOCK_W), tl.float32)
                gx = tl.zeros((BLOCK_M, 1), tl.float32)
                for j0 in range(0, GROUP // 2, ROWS):
                    j = g * (GROUP // 2) + j0 + offs_r
                    w = tl.load(WP + j[:, None].to(tl.int64) * stride_wk + offs_w[None, :],
                                mask=w_ok[None, :], other=0)
                    f0 = (((w << 19) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
                    f1 = (((w << 15) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
                    f2 = (((w << 11) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
                    f3 = (((w << 7) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
                    f4 = (((w << 3) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
                    f5 = (((w >> 1) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
                    f6 = (((w >> 5) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
                    f7 = (((w >> 9) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
                    for m in tl.static_range(BLOCK_M):
                        row_ok = (offs_r * 0 + m) < M  # a tensor mask (the interpreter needs one)
                        xe = tl.load(X + m * stride_xm + 2 * j, mask=row_ok, other=0.0).to(tl.float32)[:, None]
                        xo = tl.load(X + m * stride_xm + 2 * j + 1, mask=row_ok,
                                     other=0.0).to(tl.float32)[:, None]
                        sel = (offs_m == m)[:, None]
                        gs0 += tl.where(sel, tl.sum(f0 * xe + f1 * xo, axis=0)[None, :], 0.0)
                        gs1 += tl.where(sel, tl.sum(f2 * xe + f3 * xo, axis=0)[None, :], 0.0)
                        gs2 += tl.where(sel, tl.sum(f4 * xe + f5 * xo, axis=0)[None, :], 0.0)
                        gs3 += tl.where(sel, tl.sum(f6 * xe + f7 * xo, axis=0)[None, :], 0.0)
                        gx += tl.where(sel, tl.sum(xe + xo), 0.0)
            zp = Z + g * N + cols
            sp = S + g * N + cols
            acc0 += (16.0 * gs0 - (16.0 + tl.load(zp, mask=w_ok, other=0).to(tl.float32)[None, :]) * gx) \
                * tl.load(sp, mask=w_ok, other=0.0)[None, :]
            acc1 += (16.0 * gs1 - (16.0 + tl.load(zp + 1, mask=w_ok, other=0).to(tl.float32)[None, :]) * gx) \
                * tl.load(sp + 1, mask=w_ok, other=0.0)[None, :]
            acc2 += (16.0 * gs2 - (16.0 + tl.load(zp + 2, mask=w_ok, other=0).to(tl.float32)[None, :]) * gx) \
                * tl.load(sp + 2, mask=w_ok, other=0.0)[None, :]
            acc3 += (16.0 * gs3 - (16.0 + tl.load(zp + 3, mask=w_ok, other=0).to(tl.float32)[None, :]) * gx) \
                * tl.load(sp + 3, mask=w_ok, other=0.0)[None, :]
        _store_lanes(Y, BIAS, acc0, acc1, acc2, acc3, offs_m, cols, w_ok, M, N, pid_k,
                     HAS_BIAS, PARTIAL)

    @triton.jit
    def _int8_gemv_kernel(X, W, S, BIAS, Y, M, N, K, stride_xm, stride_wk, K_PER_SPLIT,
                          HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, ROWS: tl.constexpr):
        # W: (K, N // 4) int32; byte lane b of word [k, w]: the int8 of column 4w + b
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_w = pid_n * BLOCK_W + tl.arange(0, BLOCK_W)
        offs_r = tl.arange(0, ROWS)
        offs_m = tl.arange(0, BLOCK_M)
        w_ok = offs_w < N // 4
        cols = 4 * offs_w
        k_start = pid_k * K_PER_SPLIT
        k_end = tl.minimum(k_start + K_PER_SPLIT, K)
        if BLOCK_M == 1:
            a0 = tl.zeros((ROWS, BLOCK_W), tl.float32)
            a1 = tl.zeros((ROWS, BLOCK_W), tl.float32)
            a2 = tl.zeros((ROWS, BLOCK_W), tl.float32)
            a3 = tl.zeros((ROWS, BLOCK_W), tl.float32)
            xs = tl.zeros((ROWS,), tl.float32)
            for k0 in range(k_start, k_end, ROWS):
                k = k0 + offs_r
                k_ok = k < k_end
                w = tl.load(W + k[:, None].to(tl.int64) * stride_wk + offs_w[None, :],
                            mask=k_ok[:, None] & w_ok[None, :], other=0)
                x = tl.load(X + k, mask=k_ok, other=0.0).to(tl.float32)
                xs += x
                a0 = a0 + (((w << 15) & 0x7F8000) ^ 0x3FC00000).to(tl.float32, bitcast=True) * x[:, None]
                a1 = a1 + (((w << 7) & 0x7F8000) ^ 0x3FC00000).to(tl.float32, bitcast=True) * x[:, None]
                a2 = a2 + (((w >> 1) & 0x7F8000) ^ 0x3FC00000).to(tl.float32, bitcast=True) * x[:, None]
                a3 = a3 + (((w >> 9) & 0x7F8000) ^ 0x3FC00000).to(tl.float32, bitcast=True) * x[:, None]
            gx = tl.sum(xs, axis=0)
            acc0 = 256.0 * tl.sum(a0, axis=0)[None, :] - 384.0 * gx
            acc1 = 256.0 * tl.sum(a1, axis=0)[None, :] - 384.0 * gx
            acc2 = 256.0 * tl.sum(a2, axis=0)[None, :] - 384.0 * gx
            acc3 = 256.0 * tl.sum(a3, axis=0)[None, :] - 384.0 * gx
        else:
            acc0 = tl.zeros((BLOCK_M, BLOCK_W), tl.float32)
            acc1 = tl.zeros((BLOCK_M, BLOCK_W), tl.float32)
            acc2 = tl.zeros((BLOCK_M, BLOCK_W), tl.float32)
            acc3 = tl.zeros((BLOCK_M, BLOCK_W), tl.float32)
            gx = tl.zeros((BLOCK_M, 1), tl.float32)
            for k0 in range(k_start, k_end, ROWS):
                k = k0 + offs_r
                k_ok = k < k_end
                w = tl.load(W + k[:, None].to(tl.int64) * stride_wk + offs_w[None, :],
                            mask=k_ok[:, None] & w_ok[None, :], other=0)
                f0 = (((w << 15) & 0x7F8000) ^ 0x3FC00000).to(tl.float32, bitcast=True)
                f1 = (((w << 7) & 0x7F8000) ^ 0x3FC00000).to(tl.float32, bitcast=True)
                f2 = (((w >> 1) & 0x7F8000) ^ 0x3FC00000).to(tl.float32, bitcast=True)
                f3 = (((w >> 9) & 0x7F8000) ^ 0x3FC00000).to(tl.float32, bitcast=True)
                for m in tl.static_range(BLOCK_M):
                    x = tl.load(X + m * stride_xm + k, mask=k_ok & ((k * 0 + m) < M),
                                other=0.0).to(tl.float32)[:, None]
                    sel = (offs_m == m)[:, None]
                    acc0 += tl.where(sel, tl.sum(f0 * x, axis=0)[None, :], 0.0)
                    acc1 += tl.where(sel, tl.sum(f1 * x, axis=0)[None, :], 0.0)
                    acc2 += tl.where(sel, tl.sum(f2 * x, axis=0)[None, :], 0.0)
                    acc3 += tl.where(sel, tl.sum(f3 * x, axis=0)[None, :], 0.0)
                    gx += tl.where(sel, tl.sum(x), 0.0)
            acc0 = 256.0 * acc0 - 384.0 * gx
            acc1 = 256.0 * acc1 - 384.0 * gx
            acc2 = 256.0 * acc2 - 384.0 * gx
            acc3 = 256.0 * acc3 - 384.0 * gx
        acc0 = acc0 * tl.load(S + cols, mask=w_ok, other=0.0)[None, :]
        acc1 = acc1 * tl.load(S + cols + 1, mask=w_ok, other=0.0)[None, :]
        acc2 = acc2 * tl.load(S + cols + 2, mask=w_ok, other=0.0)[None, :]
        acc3 = acc3 * tl.load(S + cols + 3, mask=w_ok, other=0.0)[None, :]
        _store_lanes(Y, BIAS, acc0, acc1, acc2, acc3, offs_m, cols, w_ok, M, N, pid_k,
                     HAS_BIAS, PARTIAL)

    @triton.jit
    def _splitk_reduce_kernel(P, BIAS, Y, M, N, stride_ym, SPLIT_K,
                              HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        # one program: one row m, BLOCK output features; adds the SPLIT_K partial sums
        m = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        acc = tl.zeros((BLOCK,), tl.float32)
        for s in range(0, SPLIT_K):
            acc += tl.load(P + (s * M + m).to(tl.int64) * N + offs, mask=ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + m.to(tl.int64) * stride_ym + offs, acc.to(Y.dtype.element_ty), mask=ok)

    # ------------------------------------------------------------------ GEMM
    @triton.jit
    def _int8_gemm_kernel(X, W, S, BIAS, Y, M, N, K, stride_xm, stride_wk, K_PER_SPLIT,
                          HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # W: (K, N) int8, K-major: a (BLOCK_K, BLOCK_N) tile is tl.dot's right operand as is
        pid_n = tl.program_id(0)  # fastest: neighbouring programs share the x strip
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        k_start = pid_k * K_PER_SPLIT
        k_end = tl.minimum(k_start + K_PER_SPLIT, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < k_end
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + k.to(tl.int64)[:, None] * stride_wk + offs_n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0)
            # int8 -> x's dtype is exact (|q| <= 127 < 2^8)
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
        acc = acc * tl.load(S + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out_mask = m_ok[:, None] & n_ok[None, :]
        if not PARTIAL:
            if HAS_BIAS:
                acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :],
                     acc.to(Y.dtype.element_ty), mask=out_mask)
        else:
            tl.store(Y + (pid_k * M + offs_m.to(tl.int64)[:, None]) * N + offs_n[None, :], acc,
                     mask=out_mask)

    @triton.jit
    def _int4_gemm_kernel(X, WP, S, Z, BIAS, Y, M, N, K, stride_xm, stride_wk, K_PER_SPLIT,
                          GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # WP: (K // 2, N) uint8; BLOCK_K divides GROUP (one group per K tile) and
        # GROUP divides K (no mask along K). The low nibbles of a tile are the
        # weights of the even k, the high ones of the odd k:
        #     x @ W.T = x[:, 0::2] @ W_low + x[:, 1::2] @ W_high
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        HALF: tl.constexpr = BLOCK_K // 2
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_j = tl.arange(0, HALF)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        k_start = pid_k * K_PER_SPLIT
        k_end = tl.minimum(k_start + K_PER_SPLIT, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            # a contiguous (BLOCK_M, BLOCK_K) load, split into even and odd columns in registers
            x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None], other=0.0)
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, HALF, 2)))
            packed = tl.load(WP + (k0 // 2 + offs_j).to(tl.int64)[:, None] * stride_wk
                             + offs_n[None, :], mask=n_ok[None, :], other=0)  # (HALF, BLOCK_N)
            g = k0 // GROUP
            s = tl.load(S + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(Z + g * N + offs_n, mask=n_ok, other=0).to(tl.int32)
            # code - zero is an integer in [-15, 15]: exact in any float dtype
            w_lo = ((packed & 15).to(tl.int32) - z[None, :]).to(x.dtype)
            w_hi = ((packed >> 4).to(tl.int32) - z[None, :]).to(x.dtype)
            part = tl.dot(x_even, w_lo, input_precision=DOT_PRECISION)
            part = tl.dot(x_odd, w_hi, part, input_precision=DOT_PRECISION)
            acc += part * s[None, :]  # the group's scale, once per tile
        out_mask = m_ok[:, None] & n_ok[None, :]
        if not PARTIAL:
            if HAS_BIAS:
                acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :],
                     acc.to(Y.dtype.element_ty), mask=out_mask)
        else:
            tl.store(Y + (pid_k * M + offs_m.to(tl.int64)[:, None]) * N + offs_n[None, :], acc,
                     mask=out_mask)

    @triton.jit
    def _w8a8_gemm_kernel(X, W, SW, SIN, BIAS, Y, M, N, K, stride_xm, stride_wn, K_PER_SPLIT,
                          HAS_BIAS: tl.constexpr, HAS_INPUT_SCALE: tl.constexpr,
                          PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
        # W: (N, K) int8 (int8 tensor cores want both operands K-contiguous)
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
        w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
        # pass 1: each row's absmax over the whole of K -> its dynamic int8 scale
        amax = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < K
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)
            if HAS_INPUT_SCALE:
                x = x * tl.load(SIN + k, mask=k_ok, other=0.0)[None, :]
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        sx = tl.where(amax > 0.0, amax / 127.0, 1.0)  # (BLOCK_M,)
        # pass 2: quantize x tiles on the fly, int8 x int8 -> int32 on tensor cores
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        k_start = pid_k * K_PER_SPLIT
        k_end = tl.minimum(k_start + K_PER_SPLIT, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < k_end
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)
            if HAS_INPUT_SCALE:
                x = x * tl.load(SIN + k, mask=k_ok, other=0.0)[None, :]
            v = x / sx[:, None]
            r = tl.floor(v + 0.5)
            r = tl.where((r - v == 0.5) & (r % 2.0 != 0.0), r - 1.0, r)  # half to even, as torch
            xq = tl.minimum(tl.maximum(r, -127.0), 127.0).to(tl.int8)
            w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            acc = tl.dot(xq, tl.trans(w), acc, out_dtype=tl.int32)
        sw = tl.load(SW + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        out = acc.to(tl.float32) * sx[:, None] * sw[None, :]
        out_mask = m_ok[:, None] & n_ok[None, :]
        if not PARTIAL:
            if HAS_BIAS:
                out += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :],
                     out.to(Y.dtype.element_ty), mask=out_mask)
        else:
            tl.store(Y + (pid_k * M + offs_m.to(tl.int64)[:, None]) * N + offs_n[None, :], out,
                     mask=out_mask)

    # ----------------------------------------------- specs for the cross-compilation test
    def _y(t, split):  # the output pointer: final dtype, or float32 partial sums
        return "*fp32" if split > 1 else f"*{t}"

    _SCALARS = {"M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32"}

    #: jitted helpers, not kernels: compiled as part of the kernels that call them
    JIT_HELPERS = [_store_lanes]

    COMPILE_SPECS = [
        dict(fn=_int4_gemv_kernel,
             signature={"X": f"*{t}", "WP": "*i32", "S": "*fp32", "Z": "*u8", "BIAS": f"*{t}",
                        "Y": _y(t, sk), **_SCALARS, "stride_wk": "i32", "G_PER_SPLIT": "i32",
                        "GROUP": "constexpr", "HAS_BIAS": "constexpr", "PARTIAL": "constexpr",
                        "BLOCK_M": "constexpr", "BLOCK_W": "constexpr", "ROWS": "constexpr"},
             constexprs={"GROUP": g, "HAS_BIAS": bias, "PARTIAL": sk > 1, "BLOCK_M": bm,
                         "BLOCK_W": bw, "ROWS": rows})
        for t, g, bias, sk, bm, bw, rows in [("bf16", 128, False, 1, 1, 128, 16),
                                             ("fp16", 64, True, 4, 4, 128, 1),
                                             ("fp32", 32, False, 2, 2, 256, 2)]
    ] + [
        dict(fn=_int8_gemv_kernel,
             signature={"X": f"*{t}", "W": "*i32", "S": "*fp32", "BIAS": f"*{t}", "Y": _y(t, sk),
                        **_SCALARS, "stride_wk": "i32", "K_PER_SPLIT": "i32",
                        "HAS_BIAS": "constexpr", "PARTIAL": "constexpr", "BLOCK_M": "constexpr",
                        "BLOCK_W": "constexpr", "ROWS": "constexpr"},
             constexprs={"HAS_BIAS": bias, "PARTIAL": sk > 1, "BLOCK_M": bm, "BLOCK_W": bw,
                         "ROWS": rows})
        for t, bias, sk, bm, bw, rows in [("bf16", False, 1, 1, 128, 16), ("fp16", True, 4, 4, 128, 1),
                                          ("fp32", True, 1, 2, 256, 2)]
    ] + [
        dict(fn=_splitk_reduce_kernel,
             signature={"P": "*fp32", "BIAS": f"*{t}", "Y": f"*{t}", "M": "i32", "N": "i32",
                        "stride_ym": "i32", "SPLIT_K": "i32", "HAS_BIAS": "constexpr",
                        "BLOCK": "constexpr"},
             constexprs={"HAS_BIAS": bias, "BLOCK": 1024})
        for t, bias in [("bf16", True), ("fp16", False), ("fp32", True)]
    ] + [
        dict(fn=_int8_gemm_kernel,
             signature={"X": f"*{t}", "W": "*i8", "S": "*fp32", "BIAS": f"*{t}", "Y": _y(t, sk),
                        **_SCALARS, "stride_wk": "i32", "K_PER_SPLIT": "i32",
                        "HAS_BIAS": "constexpr", "PARTIAL": "constexpr",
                        "DOT_PRECISION": "constexpr", "BLOCK_M": "constexpr",
                        "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
             constexprs={"HAS_BIAS": bias, "PARTIAL": sk > 1, "DOT_PRECISION": prec,
                         "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk})
        for t, prec, bias, sk, bm, bn, bk in [("bf16", "tf32", False, 1, 128, 128, 64),
                                              ("fp16", "tf32", True, 4, 16, 64, 64),
                                              ("fp32", "ieee", False, 1, 32, 32, 32)]
    ] + [
        dict(fn=_int4_gemm_kernel,
             signature={"X": f"*{t}", "WP": "*u8", "S": "*fp32", "Z": "*u8", "BIAS": f"*{t}",
                        "Y": _y(t, sk), **_SCALARS, "stride_wk": "i32", "K_PER_SPLIT": "i32",
                        "GROUP": "constexpr", "HAS_BIAS": "constexpr", "PARTIAL": "constexpr",
                        "DOT_PRECISION": "constexpr", "BLOCK_M": "constexpr",
                        "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
             constexprs={"GROUP": g, "HAS_BIAS": bias, "PARTIAL": sk > 1, "DOT_PRECISION": prec,
                         "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk})
        for t, prec, g, bias, sk, bm, bn, bk in [("bf16", "tf32", 128, False, 1, 128, 128, 64),
                                                 ("fp16", "tf32", 64, True, 4, 16, 64, 64),
                                                 ("fp32", "ieee", 32, False, 1, 32, 32, 32)]
    ] + [
        dict(fn=_w8a8_gemm_kernel,
             signature={"X": f"*{t}", "W": "*i8", "SW": "*fp32", "SIN": "*fp32", "BIAS": f"*{t}",
                        "Y": _y(t, sk), **_SCALARS, "stride_wn": "i32", "K_PER_SPLIT": "i32",
                        "HAS_BIAS": "constexpr", "HAS_INPUT_SCALE": "constexpr",
                        "PARTIAL": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                        "BLOCK_K": "constexpr"},
             constexprs={"HAS_BIAS": bias, "HAS_INPUT_SCALE": sin, "PARTIAL": sk > 1,
                         "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk})
        for t, bias, sin, sk, bm, bn, bk in [("bf16", False, True, 1, 128, 128, 64),
                                             ("fp16", True, False, 4, 16, 64, 64),
                                             ("fp32", False, False, 1, 32, 32, 32)]
    ]


# ====================================================================== wrappers
@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(device: torch.device) -> int:
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


CONFIG_KEYS = ("path", "block_m", "block_n", "block_k", "block_w", "rows", "split_k", "num_warps",
               "num_stages")


def choose_config(kind: str, M: int, N: int, K: int, dtype: torch.dtype = torch.float16,
                  device=None, group_size: int | None = None, path: str = "auto") -> dict:
    """The launch configuration a wrapper uses by default (a dict you can edit
    and pass back as ``config=``).

    kind: 'int8', 'int4' or 'w8a8'. path: 'auto' (GEMV for M <=
    :data:`GEMV_MAX_ROWS` rows when N is a multiple of 4, else GEMM; W8A8
    always GEMM), 'gemv' or 'gemm'. Keys (:data:`CONFIG_KEYS`): path; GEMV:
    block_m (rows of x, a power of 2 >= M), block_w (int32 words of weights
    per row of the tile = 4 output features each), rows (k rows per step);
    GEMM: block_m, block_n, block_k; both: split_k (None = decide from the
    grid), num_warps, num_stages. Fixed defaults by size class, untuned (the
    benchmark sweeps GEMV alternatives on a GPU).
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    gpu = device.type == "cuda" and not INTERPRETED
    if kind == "w8a8":
        if path == "gemv":
            raise ValueError("w8a8 has no GEMV path (int8 activations go through tl.dot)")
        path = "gemm"
    elif path == "auto":
        path = "gemv" if M <= GEMV_MAX_ROWS and N % 4 == 0 else "gemm"
    cfg = dict(path=path, block_m=None, block_n=None, block_k=None, block_w=None, rows=None,
               split_k=None, num_warps=4, num_stages=3 if gpu else 1)
    if path == "gemv":
        # one warp spans 128 words (32 threads x 16-byte vectors): a thread then
        # holds every k row of its columns
        if gpu:
            # 128 words = one warp's 32 threads x 16-byte vectors. M = 1: 4 warps stacked
            # along k (4 rows each; a cross-warp sum once per group). M > 1: one warp
            # holding every row of its tile (the per-row sums of each step must stay
            # in the thread), fewer rows as M grows (registers: M=4, rows=2 spills).
            if M == 1:
                cfg.update(block_m=1, rows=16, block_w=128, num_warps=4)
            else:
                cfg.update(block_m=_next_pow2(M), rows=2 if M == 2 else 1, block_w=128,
                           num_warps=1)
        else:  # the interpreter pays per operation: big tiles, few steps
            cfg.update(block_m=_next_pow2(M), rows=16, block_w=64)
        return cfg
    if not gpu:
        cfg.update(block_m=16, block_n=32, block_k=32)
        return cfg
    bm = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    bn = 64 if M <= 64 else 128
    if dtype == torch.float32 and kind != "w8a8":
        bk, stages = 32, 2
    else:
        bk, stages = (128 if kind == "w8a8" else 64), 3
    if kind == "int4":
        bk = min(bk, group_size)
    cfg.update(block_m=bm, block_n=bn, block_k=bk, num_stages=stages,
               num_warps=8 if bm * bn >= 128 * 128 else 4)
    return cfg


def _split(K: int, unit: int, programs: int, device: torch.device, split_k: int | None,
           min_units: int = 1, warps: int = 4):
    """(split_k, units per split): K cut into chunks of whole ``unit`` s (K tiles,
    groups). Default on a GPU: split until the grid holds about 8 warps per SM
    (a memory-bound kernel needs many loads in flight), keeping >=
    ``min_units`` units per chunk; under the interpreter: no split unless asked."""
    units = _cdiv(K, unit)
    if split_k is None:
        split_k = 1
        if device.type == "cuda" and not INTERPRETED:
            want = _cdiv(8 * _sms(device), max(1, warps))
            split_k = max(1, min(_cdiv(want, programs), units // min_units, 64))
    if isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"split_k must be a positive int, got {split_k!r}")
    per = _cdiv(units, min(split_k, units))
    return _cdiv(units, per), per


def _check_x(name: str, x: torch.Tensor, K: int, device: torch.device) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{name}: x of shape {tuple(x.shape)} does not end in the weight's "
                         f"in_features {K}")
    if x.device != device:
        raise ValueError(f"{name}: x is on {x.device} but the weights on {device}")


def _check_bias(name: str, bias: torch.Tensor | None, N: int, device: torch.device) -> None:
    if bias is not None and (bias.shape != (N,) or bias.device != device):
        raise ValueError(f"{name}: bias must have shape ({N},) on {device}, got "
                         f"{tuple(bias.shape)} on {bias.device}")


def check_int8_weight(qweight_t: torch.Tensor, scales: torch.Tensor) -> tuple[int, int]:
    """Validate the int8 weight-only format (K-major qweight_t (K, N) int8,
    scales (N,) float32); returns (N, K). Raises ValueError."""
    if qweight_t.dtype != torch.int8 or qweight_t.dim() != 2:
        raise ValueError(f"int8 weight must be a 2-D int8 tensor (K, N), got {qweight_t.dtype} "
                         f"{tuple(qweight_t.shape)}")
    K, N = qweight_t.shape
    if scales.dim() == 1 and scales.shape[0] == K != N:
        raise ValueError(f"int8 weight of shape {tuple(qweight_t.shape)} with {K} scales: the weight "
                         f"looks transposed; int8_matmul takes it K-major, qweight_t of shape "
                         f"(K, N) = ({N}, {K}) here (pass qweight.t())")
    if scales.shape != (N,) or scales.dtype != torch.float32:
        raise ValueError(f"int8 scales must be float32 of shape ({N},), got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    if scales.device != qweight_t.device:
        raise ValueError("int8 weight and scales are on different devices")
    return N, K


def check_w8a8_weight(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[int, int]:
    """Validate the W8A8 weight (qweight (N, K) int8, scales (N,) float32); returns (N, K).
    Raises ValueError for other dtypes or shapes, naming a weight that looks
    transposed ((K, N) with N scales) as such."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"w8a8 weight must be a 2-D int8 tensor (N, K), got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    N, K = qweight.shape
    if scales.dim() == 1 and scales.shape[0] == K != N:
        raise ValueError(f"w8a8 weight of shape {tuple(qweight.shape)} with {K} scales: the weight "
                         f"looks transposed; w8a8_matmul takes it as (N, K) = ({K}, {N}) here, one "
                         "row per output feature (pass qweight.t())")
    if scales.shape != (N,) or scales.dtype != torch.float32 or scales.device != qweight.device:
        raise ValueError(f"w8a8 scales must be float32 of shape ({N},) on {qweight.device}, got "
                         f"{scales.dtype} {tuple(scales.shape)} on {scales.device}")
    return N, K


def check_int4_weight(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int) -> tuple[int, int]:
    """Validate the packed int4 format (packed (K // 2, N) uint8, scales and
    zeros (K // G, N)); returns (N, K). Raises ValueError with the reason
    (unsupported group size, K not a multiple of it, shapes, dtypes, a
    weight that looks transposed)."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed int4 weight must be a 2-D uint8 tensor (K // 2, N), got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    K, N = packed.shape[0] * 2, packed.shape[1]
    if scales.dim() == 2 and scales.shape[1] == packed.shape[0] != packed.shape[1]:
        raise ValueError(f"packed int4 weight of shape {tuple(packed.shape)} with scales of shape "
                         f"{tuple(scales.shape)}: the weight looks transposed; int4_matmul takes it "
                         f"as (K // 2, N) = ({packed.shape[1]}, {packed.shape[0]}) here (pass "
                         "packed.t())")
    if K % group_size:
        raise ValueError(f"in_features {K} is not a multiple of the group size {group_size}")
    G = K // group_size
    if scales.shape != (G, N) or scales.dtype != torch.float32:
        raise ValueError(f"int4 scales must be float32 of shape ({G}, {N}), got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    if zeros.shape != (G, N) or zeros.dtype != torch.uint8:
        raise ValueError(f"int4 zeros must be uint8 of shape ({G}, {N}), got {zeros.dtype} "
                         f"{tuple(zeros.shape)}")
    if not (scales.device == zeros.device == packed.device):
        raise ValueError("int4 packed weight, scales and zeros are on different devices")
    return N, K


def _rows(x: torch.Tensor, K: int) -> torch.Tensor:
    x2 = x.reshape(-1, K)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _resolve(kind, M, N, K, x, group_size, path, config) -> dict:
    cfg = choose_config(kind, M, N, K, x.dtype, x.device, group_size, path)
    if config:
        unknown = set(config) - set(CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known: {list(CONFIG_KEYS)}")
        if config.get("path", cfg["path"]) != cfg["path"]:  # the other path's defaults
            cfg = choose_config(kind, M, N, K, x.dtype, x.device, group_size, config["path"])
        cfg.update({k: v for k, v in config.items() if v is not None or k == "split_k"})
    if cfg["path"] not in ("gemv", "gemm"):
        raise ValueError(f"config path must be 'gemv' or 'gemm', got {cfg['path']!r}")
    if cfg["path"] == "gemv":
        if N % 4:
            raise ValueError(f"the GEMV path reads 4 output features per int32 word: out_features "
                             f"{N} is not a multiple of 4 (use path='gemm')")
        if cfg["block_m"] < M:
            raise ValueError(f"the GEMV path holds all rows in one tile: block_m "
                             f"{cfg['block_m']} < M {M}")
        if kind == "int4" and (group_size // 2) % cfg["rows"]:
            raise ValueError(f"rows {cfg['rows']} must divide group_size // 2 = {group_size // 2}")
    else:
        small = cfg["block_k"] // 2 if kind == "int4" else cfg["block_k"]
        if min(cfg["block_m"], cfg["block_n"], small) < 16:
            raise ValueError("tl.dot needs tiles of at least 16 (block_k // 2 for int4)")
        if kind == "int4" and group_size % cfg["block_k"]:
            raise ValueError(f"block_k {cfg['block_k']} must divide the group size {group_size}")
    return cfg


def _launch(kind: str, x2: torch.Tensor, tensors: tuple, bias: torch.Tensor | None, N: int,
            K: int, cfg: dict, group_size: int | None = None,
            input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Run one of the kernels on x2 (M, K); returns (M, N) in x2's dtype."""
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if M == 0 or N == 0:
        return y
    gemv = cfg["path"] == "gemv"
    if gemv:
        programs = _cdiv(N // 4, cfg["block_w"])
        if kind == "int4":  # split by whole groups
            split, per = _split(K, group_size, programs, x2.device, cfg["split_k"],
                                warps=cfg["num_warps"])
        else:  # by whole steps of `rows`, at least 128 k per chunk
            split, per = _split(K, cfg["rows"], programs, x2.device, cfg["split_k"],
                                min_units=max(1, 128 // cfg["rows"]), warps=cfg["num_warps"])
            per *= cfg["rows"]
    else:
        programs = _cdiv(N, cfg["block_n"]) * _cdiv(M, cfg["block_m"])
        split, per = _split(K, cfg["block_k"], programs, x2.device, cfg["split_k"],
                            warps=cfg["num_warps"])
        per *= cfg["block_k"]
    target = y if split == 1 else torch.empty((split, M, N), dtype=torch.float32,
                                              device=x2.device)
    b = bias if bias is not None else y  # a placeholder pointer when there is no bias
    launch = {} if INTERPRETED else dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    has_bias = bias is not None and split == 1
    prec = "ieee" if x2.dtype == torch.float32 else "tf32"
    w = tensors[0]
    with torch.cuda.device(x2.device) if x2.is_cuda else contextlib.nullcontext():
        if gemv:
            words = w.view(torch.int32)  # (rows of K, N // 4)
            grid = (programs, split)
            consts = dict(HAS_BIAS=has_bias, PARTIAL=split > 1, BLOCK_M=cfg["block_m"],
                          BLOCK_W=cfg["block_w"], ROWS=cfg["rows"], **launch)
            if kind == "int8":
                _int8_gemv_kernel[grid](x2, words, tensors[1], b, target, M, N, K, x2.stride(0),
                                        words.stride(0), per, **consts)
            else:
                _int4_gemv_kernel[grid](x2, words, tensors[1], tensors[2], b, target, M, N, K,
                                        x2.stride(0), words.stride(0), per, GROUP=group_size,
                                        **consts)
        else:
            grid = (_cdiv(N, cfg["block_n"]), _cdiv(M, cfg["block_m"]), split)
            consts = dict(HAS_BIAS=has_bias, PARTIAL=split > 1, BLOCK_M=cfg["block_m"],
                          BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], **launch)
            common = (M, N, K, x2.stride(0), w.stride(0), per)
            if kind == "int8":
                _int8_gemm_kernel[grid](x2, w, tensors[1], b, target, *common,
                                        DOT_PRECISION=prec, **consts)
            elif kind == "int4":
                _int4_gemm_kernel[grid](x2, w, tensors[1], tensors[2], b, target, *common,
                                        GROUP=group_size, DOT_PRECISION=prec, **consts)
            else:
                sin = input_scale if input_scale is not None else tensors[1]
                _w8a8_gemm_kernel[grid](x2, w, tensors[1], sin, b, target, *common,
                                        HAS_INPUT_SCALE=input_scale is not None, **consts)
        if split > 1:
            block = min(1024, _next_pow2(N))
            _splitk_reduce_kernel[(M, _cdiv(N, block))](target, b, y, M, N, N, split,
                                                         HAS_BIAS=bias is not None, BLOCK=block)
    return y


def int8_matmul(x: torch.Tensor, qweight_t: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None, *, path: str = "auto",
                config: dict | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W = (qweight_t * scales).T`` dequantized in the kernel.

    x: (..., K) float32/float16/bfloat16; qweight_t: (K, N) int8 (K-major);
    scales: (N,) float32; bias: (N,) or None. Returns (..., N) in x's dtype
    (float32 accumulation). path / config: see :func:`choose_config`. Falls
    back to :func:`reference.int8_matmul_ref` where no kernel can run here.
    Raises ValueError on bad shapes, dtypes, devices or configs.
    """
    N, K = check_int8_weight(qweight_t, scales)
    _check_x("int8_matmul", x, K, qweight_t.device)
    _check_bias("int8_matmul", bias, N, qweight_t.device)
    extra = () if bias is None else (bias,)
    x2 = _rows(x, K)
    cfg = _resolve("int8", x2.shape[0], N, K, x2, None, path, config)  # checked either way
    if not can_launch(x, qweight_t, scales, *extra):
        return int8_matmul_ref(x, qweight_t, scales, bias)
    y = _launch("int8", x2, (qweight_t.contiguous(), scales.contiguous()), bias, N, K, cfg)
    return y.reshape(*x.shape[:-1], N)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None = None, *,
                path: str = "auto", config: dict | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with W in the packed int4 format, dequantized in the kernel.

    x: (..., K) float32/float16/bfloat16; packed: (K // 2, N) uint8; scales:
    (K // group_size, N) float32; zeros: same shape, uint8 in [0, 15];
    group_size in :data:`GROUP_SIZES` and dividing K. Returns (..., N) in x's
    dtype. path / config: see :func:`choose_config`. Falls back to
    :func:`reference.int4_matmul_ref` where no kernel can run here.
    Raises ValueError on a bad group size, K not a multiple of it, bad shapes,
    dtypes, devices or configs.
    """
    N, K = check_int4_weight(packed, scales, zeros, group_size)
    _check_x("int4_matmul", x, K, packed.device)
    _check_bias("int4_matmul", bias, N, packed.device)
    extra = () if bias is None else (bias,)
    x2 = _rows(x, K)
    cfg = _resolve("int4", x2.shape[0], N, K, x2, group_size, path, config)  # checked either way
    if not can_launch(x, packed, scales, zeros, *extra):
        return int4_matmul_ref(x, packed, scales, zeros, group_size, bias)
    y = _launch("int4", x2, (packed.contiguous(), scales.contiguous(), zeros.contiguous()),
                bias, N, K, cfg, group_size=group_size)
    return y.reshape(*x.shape[:-1], N)


def w8a8_matmul(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None, *,
                config: dict | None = None) -> torch.Tensor:
    """W8A8: int8 weights (N, K) with per-channel float32 scales (N,); x (..., K)
    float, times ``input_scale`` (K,) float32 when given, quantized to int8 per
    token inside the kernel; int32 accumulation. Returns (..., N) in x's dtype.
    Falls back to :func:`reference.w8a8_matmul_ref` where no kernel can run.
    Raises ValueError on bad shapes, dtypes, devices or configs (a weight
    given as (K, N) is named as transposed).
    """
    N, K = check_w8a8_weight(qweight, w_scales)
    _check_x("w8a8_matmul", x, K, qweight.device)
    _check_bias("w8a8_matmul", bias, N, qweight.device)
    if input_scale is not None and (input_scale.shape != (K,) or input_scale.dtype != torch.float32
                                    or input_scale.device != qweight.device):
        raise ValueError(f"w8a8_matmul: input_scale must be float32 of shape ({K},) on "
                         f"{qweight.device}")
    extra = tuple(t for t in (bias, input_scale) if t is not None)
    x2 = _rows(x, K)
    cfg = _resolve("w8a8", x2.shape[0], N, K, x2, None, "auto", config)  # checked either way
    if not can_launch(x, qweight, w_scales, *extra):
        return w8a8_matmul_ref(x, qweight, w_scales, bias, input_scale)
    y = _launch("w8a8", x2, (qweight.contiguous(), w_scales.contiguous()), bias, N, K, cfg,
                input_scale=None if input_scale is None else input_scale.contiguous())
    return y.reshape(*x.shape[:-1], N)
