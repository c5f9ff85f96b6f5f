"""2:4 semi-structured sparsity: a compressed weight format and a GEMV that reads it.

A weight W (N out x K in) is *2:4 sparse* when every group of 4 consecutive
inputs (columns 4g .. 4g + 3 of a row) holds at most 2 nonzeros: half the
weights are zero, in a pattern regular enough to store compactly and, on
NVIDIA GPUs from Ampere (sm_80) on, to feed the sparse tensor cores.

Format (:func:`compress_24` builds it, :func:`reference.decompress_24_ref`
undoes it; K a multiple of 8):

* ``values`` (N, K // 2), W's dtype: the 2 kept entries of group g at
  ``values[:, 2g]`` and ``values[:, 2g + 1]``, in increasing column order;
* ``meta`` (N, K // 8) uint8: the in-group index (0..3) of each kept value,
  4 indices per byte, first value in the low bits. Bits ``2i .. 2i + 1`` of
  ``meta[n, j]`` hold the index of ``values[n, 4j + i]``; one byte covers the
  groups 2j and 2j + 1 (columns 8j .. 8j + 7)::

      W[n, 4 * ((4j + i) // 2) + ((meta[n, j] >> 2i) & 3)] = values[n, 4j + i]

  A group with fewer than 2 nonzeros keeps zeros at the lowest free positions
  (all-zero group: indices 0 and 1; a single nonzero at 3: indices 0 and 3).

Bytes: N*K/2 values + N*K/8 metadata bytes; in fp16 that is ``N*K + N*K/8``
bytes against ``2*N*K`` dense: 0.5625x. (This is our own layout, simple to
read in a kernel; the sparse tensor cores want a hardware-specific reordering
of the same information, which :func:`to_semi_structured` leaves to torch.)

Kernels (decode-shaped x: M <= :data:`GEMV_MAX_ROWS` rows):

* :func:`sparse24_matmul` -- ``_sparse24_gemv_kernel``: a program owns
  BLOCK_N output features and walks K in steps of BLOCK_B metadata bytes (8 *
  BLOCK_B inputs). Each step loads a (BLOCK_N, BLOCK_B, 4) tile of values and
  the (BLOCK_N, BLOCK_B) bytes that index them, unpacks the 2-bit indices and
  *gathers* ``x[k]`` at ``k = 8b + 4 (i // 2) + idx`` for each kept value,
  multiplying and accumulating in float32. No tensor cores: M = 1 could not
  use them, and the gather is what a GEMV does instead.
* :func:`dense_gemv` -- ``_dense_gemv_kernel``: the same program over a dense
  W (N, K), same BLOCK_N and the same K span per step (BLOCK_K = 8 * BLOCK_B),
  as the fair baseline of the benchmark: the sparse kernel reads 0.5625x its
  weight bytes (fp16/bf16), plus gathers of x that stay in cache.

Both check shapes, dtypes and devices with a clear ValueError (as
:mod:`quant_matmul` does; this package imports nothing from the rest of
llmopt_lab) and fall back to their plain-torch references where no kernel can
run here (:func:`llmopt_lab.kernels.can_launch`) or when x has more than
:data:`GEMV_MAX_ROWS` rows.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import HAS_TRITON, INTERPRETED, can_launch
from .reference import _linear_ref, decompress_24_ref, sparse24_matmul_ref

#: at most this many rows (tokens) of x go through the GEMV kernels
GEMV_MAX_ROWS = 16
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CONFIG_KEYS = ("block_m", "block_n", "block_b", "num_warps", "num_stages")

#: the 2:4 inverse, under the name of the pair (the reference is the specification)
decompress_24 = decompress_24_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _store_rows(Y, BIAS, acc, offs_m, offs_n, M, N, HAS_BIAS: tl.constexpr):
        # the epilogue of both GEMVs: acc (BLOCK_M, BLOCK_N) float32 (+ bias) -> Y (M, N)
        n_ok = offs_n < N
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :],
                 acc.to(Y.dtype.element_ty), mask=(offs_m < M)[:, None] & n_ok[None, :])

    @triton.jit
    def _sparse24_gemv_kernel(X, V, MT, BIAS, Y, M, N, KB, stride_xm, stride_vn, stride_mn,
                              HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
        # V: (N, K // 2) kept values; MT: (N, KB = K // 8) uint8, 4 two-bit indices a byte.
        # Kept value i (0..3) of byte b sits in group 2b + i // 2, at input column
        # k = 8b + 4 (i // 2) + idx, idx = (byte >> 2i) & 3.
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_b = tl.arange(0, BLOCK_B)
        offs_m = tl.arange(0, BLOCK_M)
        lane = tl.arange(0, 4)[None, None, :]  # i: which of the byte's 4 values
        n_ok = offs_n < N
        v_rows = V + offs_n.to(tl.int64)[:, None, None] * stride_vn
        m_rows = MT + offs_n.to(tl.int64)[:, None] * stride_mn
        if BLOCK_M == 1:  # decode: per-element float32 sums, reduced once at the end
            acc3 = tl.zeros((BLOCK_N, BLOCK_B, 4), tl.float32)
            for b0 in range(0, KB, BLOCK_B):
                b = b0 + offs_b
                ok2 = n_ok[:, None] & (b < KB)[None, :]
                ok3 = ok2[:, :, None] & (lane < 4)
                meta = tl.load(m_rows + b[None, :], mask=ok2, other=0).to(tl.int32)
                k = 8 * b[None, :, None] + 4 * (lane // 2) + ((meta[:, :, None] >> (2 * lane)) & 3)
                v = tl.load(v_rows + 4 * b[None, :, None] + lane, mask=ok3, other=0.0)
                xg = tl.load(X + k, mask=ok3, other=0.0)  # the gather: x at each kept column
                acc3 += v.to(tl.float32) * xg.to(tl.float32)
            acc = tl.sum(tl.sum(acc3, axis=2), axis=1)[None, :]
        else:  # a few rows: the weight tile is loaded once and serves every row
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for b0 in range(0, KB, BLOCK_B):
                b = b0 + offs_b
                ok2 = n_ok[:, None] & (b < KB)[None, :]
                ok3 = ok2[:, :, None] & (lane < 4)
                meta = tl.load(m_rows + b[None, :], mask=ok2, other=0).to(tl.int32)
                k = 8 * b[None, :, None] + 4 * (lane // 2) + ((meta[:, :, None] >> (2 * lane)) & 3)
                v = tl.load(v_rows + 4 * b[None, :, None] + lane, mask=ok3,
                            other=0.0).to(tl.float32)
                for m in tl.static_range(BLOCK_M):
                    row_ok = ok3 & ((k * 0 + m) < M)  # a tensor mask (the interpreter needs one)
                    xg = tl.load(X + m * stride_xm + k, mask=row_ok, other=0.0).to(tl.float32)
                    part = tl.sum(tl.sum(v * xg, axis=2), axis=1)  # (BLOCK_N,)
                    acc += tl.where((offs_m == m)[:, None], part[None, :], 0.0)
        _store_rows(Y, BIAS, acc, offs_m, offs_n, M, N, HAS_BIAS)

    @triton.jit
    def _dense_gemv_kernel(X, W, BIAS, Y, M, N, K, stride_xm, stride_wn,
                           HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
        # W: (N, K), rows K-contiguous (nn.Linear's layout); the sparse kernel's tiling
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        offs_m = tl.arange(0, BLOCK_M)
        n_ok = offs_n < N
        w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
        if BLOCK_M == 1:
            acc2 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + offs_k
                k_ok = k < K
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                x = tl.load(X + k, mask=k_ok, other=0.0)
                acc2 += w.to(tl.float32) * x.to(tl.float32)[None, :]
            acc = tl.sum(acc2, axis=1)[None, :]
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + offs_k
                k_ok = k < K
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                            other=0.0).to(tl.float32)
                for m in tl.static_range(BLOCK_M):
                    x = tl.load(X + m * stride_xm + k, mask=k_ok & ((k * 0 + m) < M),
                                other=0.0).to(tl.float32)
                    part = tl.sum(w * x[None, :], axis=1)
                    acc += tl.where((offs_m == m)[:, None], part[None, :], 0.0)
        _store_rows(Y, BIAS, acc, offs_m, offs_n, M, N, HAS_BIAS)

    # ----------------------------------------------- specs for the cross-compilation test
    #: jitted helpers, not kernels: compiled as part of the kernels that call them
    JIT_HELPERS = [_store_rows]

    _SCALARS = {"M": "i32", "N": "i32"}

    COMPILE_SPECS = [
        dict(fn=_sparse24_gemv_kernel,
             signature={"X": f"*{t}", "V": f"*{t}", "MT": "*u8", "BIAS": f"*{t}", "Y": f"*{t}",
                        **_SCALARS, "KB": "i32", "stride_xm": "i32", "stride_vn": "i32",
                        "stride_mn": "i32", "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr",
                        "BLOCK_N": "constexpr", "BLOCK_B": "constexpr"},
             constexprs={"HAS_BIAS": bias, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_B": bb})
        for t, bias, bm, bn, bb in [("fp16", False, 1, 16, 64), ("bf16", True, 4, 16, 64),
                                    ("fp32", True, 16, 8, 32)]
    ] + [
        dict(fn=_dense_gemv_kernel,
             signature={"X": f"*{t}", "W": f"*{t}", "BIAS": f"*{t}", "Y": f"*{t}", **_SCALARS,
                        "K": "i32", "stride_xm": "i32", "stride_wn": "i32",
                        "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                        "BLOCK_K": "constexpr"},
             constexprs={"HAS_BIAS": bias, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk})
        for t, bias, bm, bn, bk in [("fp16", False, 1, 16, 512), ("bf16", True, 4, 16, 512),
                                    ("fp32", True, 16, 8, 256)]
    ]


# ====================================================================== format
def compress_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4 sparse weight into ``(values, meta)`` (layout: module docstring).

    w: (N, K) float32/float16/bfloat16, K a positive multiple of 8, with at
    most 2 nonzeros in every group of 4 consecutive entries of a row (columns
    4g .. 4g + 3); NaN counts as nonzero. Returns values (N, K // 2) in w's
    dtype and meta (N, K // 8) uint8, on w's device. A group with fewer than 2
    nonzeros keeps zeros at its lowest free positions, so the result is
    deterministic. Exact: ``decompress_24(*compress_24(w))`` equals w (a -0.0
    left out of a group comes back as +0.0).

    Raises ValueError when w is not a 2-D float tensor, when K is not a positive
    multiple of 8 (a metadata byte covers 2 groups), or when a group holds more
    than 2 nonzeros (the message names the first such row and group).
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in FLOAT_DTYPES:
        raise ValueError("compress_24: w must be a 2-D float32/float16/bfloat16 tensor (N, K), "
                         f"got {getattr(w, 'dtype', type(w).__name__)} "
                         f"{tuple(getattr(w, 'shape', ()))}")
    N, K = w.shape
    if K == 0 or K % 8:
        raise ValueError(f"compress_24: in_features K={K} must be a positive multiple of 8 "
                         "(groups of 4 inputs, 2 groups per metadata byte)")
    groups = w.reshape(N, K // 4, 4)
    nonzero = groups != 0  # NaN != 0 is True: a NaN is kept
    counts = nonzero.sum(-1)
    if bool((counts > 2).any()):
        row, g = (counts > 2).nonzero()[0].tolist()
        found = [float(v) for v in groups[row, g].float().tolist()]
        raise ValueError(f"compress_24: w is not 2:4 sparse: row {row}, group {g} (columns "
                         f"{4 * g}..{4 * g + 3}) has {int(counts[row, g])} nonzeros {found}; "
                         "at most 2 of every 4 consecutive inputs may be nonzero (prune first)")
    # the 2 kept positions: nonzeros first, then the lowest zero positions; in column order
    pos = torch.arange(4, device=w.device)
    score = nonzero.to(torch.int64) * 8 + (3 - pos)  # distinct in a group
    kept = score.topk(2, dim=-1).indices.sort(dim=-1).values  # (N, K // 4, 2)
    values = groups.gather(-1, kept).reshape(N, K // 2)
    idx = kept.reshape(N, K // 8, 4).to(torch.int32)
    meta = idx[..., 0] | (idx[..., 1] << 2) | (idx[..., 2] << 4) | (idx[..., 3] << 6)
    return values.contiguous(), meta.to(torch.uint8)


def check_sparse24(values: torch.Tensor, meta: torch.Tensor) -> tuple[int, int]:
    """Validate the compressed format: values (N, K // 2) float32/float16/
    bfloat16, meta (N, K // 8) uint8, same device. Returns (N, K). Raises ValueError."""
    if values.dim() != 2 or values.dtype not in FLOAT_DTYPES:
        raise ValueError(f"2:4 values must be a 2-D float32/float16/bfloat16 tensor (N, K // 2), "
                         f"got {values.dtype} {tuple(values.shape)}")
    N, half = values.shape
    if half == 0 or half % 4:
        raise ValueError(f"2:4 values (N, K // 2) need K a positive multiple of 8, got K // 2 = "
                         f"{half}")
    if meta.dtype != torch.uint8 or meta.shape != (N, half // 4):
        raise ValueError(f"2:4 meta must be uint8 of shape (N, K // 8) = ({N}, {half // 4}), got "
                         f"{meta.dtype} {tuple(meta.shape)}")
    if meta.device != values.device:
        raise ValueError(f"2:4 values are on {values.device} but meta on {meta.device}")
    return N, 2 * half


# ====================================================================== wrappers
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def choose_config(M: int, device=None) -> dict:
    """The launch configuration of both GEMVs (a dict you can edit and pass back
    as ``config=``): block_m (rows of x, a power of 2 >= M), block_n (output
    features per program), block_b (metadata bytes per step: 8 * block_b
    inputs; the dense kernel steps over the same K span), num_warps,
    num_stages. Fixed defaults, untuned."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    cfg = dict(block_m=_next_pow2(max(1, M)), num_warps=4, num_stages=1)
    if device.type == "cuda" and not INTERPRETED:
        # N / 16 programs (256 for N = 4096), 512 inputs per step
        cfg.update(block_n=16, block_b=64, num_stages=2)
    else:  # the interpreter pays per operation: big tiles, few steps
        cfg.update(block_n=32, block_b=32)
    return cfg


def _resolve(M: int, x: torch.Tensor, config: dict | None) -> dict:
    cfg = choose_config(M, x.device)
    if config:
        unknown = set(config) - set(CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; known: {list(CONFIG_KEYS)}")
        cfg.update({k: v for k, v in config.items() if v is not None})
    for key in ("block_m", "block_n", "block_b"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"config {key} must be a positive power of 2, got {v!r}")
    if cfg["block_m"] < M and M <= GEMV_MAX_ROWS:
        raise ValueError(f"the GEMV holds all rows of x in one tile: block_m {cfg['block_m']} "
                         f"< M {M}")
    return cfg


def _check_x(name: str, x: torch.Tensor, K: int, w: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != w.dtype:
        raise ValueError(f"{name}: x must have the weights' dtype {w.dtype}, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{name}: x of shape {tuple(x.shape)} does not end in the weight's "
                         f"in_features {K}")
    if x.device != w.device:
        raise ValueError(f"{name}: x is on {x.device} but the weights on {w.device}")


def _check_bias(name: str, bias: torch.Tensor | None, N: int, w: torch.Tensor) -> None:
    if bias is not None and (bias.shape != (N,) or bias.device != w.device
                             or bias.dtype != w.dtype):
        raise ValueError(f"{name}: bias must be {w.dtype} of shape ({N},) on {w.device}, got "
                         f"{bias.dtype} {tuple(bias.shape)} on {bias.device}")


def _rows(x: torch.Tensor, K: int) -> torch.Tensor:
    x2 = x.reshape(-1, K)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _k_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def sparse24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None, *,
                    config: dict | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with W 2:4 sparse in the compressed format, for decode.

    x: (..., K) in values' dtype (float32/float16/bfloat16); values: (N, K // 2);
    meta: (N, K // 8) uint8 (see :func:`compress_24`); bias: (N,) in the same
    dtype, or None. Returns (..., N) in x's dtype, accumulated in float32.
    With at most :data:`GEMV_MAX_ROWS` rows the Triton GEMV runs (it reads
    0.5625x the bytes of a dense fp16 weight); with more rows, or where no kernel
    can run here, :func:`reference.sparse24_matmul_ref` (decompress, then a
    float32 matmul). config: see :func:`choose_config`.
    Raises ValueError on bad shapes, dtypes, devices or configs.
    """
    N, K = check_sparse24(values, meta)
    _check_x("sparse24_matmul", x, K, values)
    _check_bias("sparse24_matmul", bias, N, values)
    x2 = _rows(x, K)
    M = x2.shape[0]
    cfg = _resolve(M, x2, config)  # checked either way
    extra = () if bias is None else (bias,)
    if M > GEMV_MAX_ROWS or not can_launch(x, values, meta, *extra):
        return sparse24_matmul_ref(x, values, meta, bias)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M and N:
        v, mt = _k_contiguous(values), _k_contiguous(meta)
        launch = {} if INTERPRETED else dict(num_warps=cfg["num_warps"],
                                             num_stages=cfg["num_stages"])
        grid = (_cdiv(N, cfg["block_n"]),)
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _sparse24_gemv_kernel[grid](
                x2, v, mt, bias if bias is not None else y, y, M, N, K // 8, x2.stride(0),
                v.stride(0), mt.stride(0), HAS_BIAS=bias is not None, BLOCK_M=cfg["block_m"],
                BLOCK_N=cfg["block_n"], BLOCK_B=cfg["block_b"], **launch)
    return y.reshape(*x.shape[:-1], N)


#: the kernel under the name of what it is, for the benchmark beside dense_gemv
sparse24_gemv = sparse24_matmul


def dense_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
               config: dict | None = None) -> torch.Tensor:
    """``x @ w.T + bias`` by a dense Triton GEMV tiled like the 2:4 one (the
    benchmark's fair baseline: same program, same steps over K, full weights).

    x: (..., K) in w's dtype (float32/float16/bfloat16); w: (N, K); bias: (N,)
    in the same dtype, or None. Returns (..., N) in x's dtype, accumulated in
    float32. With more than :data:`GEMV_MAX_ROWS` rows, or where no kernel can
    run here, a float32 torch matmul stands in. config: see
    :func:`choose_config` (block_b * 8 inputs per step). Raises ValueError on bad
    shapes, dtypes, devices or configs.
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in FLOAT_DTYPES:
        raise ValueError("dense_gemv: w must be a 2-D float32/float16/bfloat16 tensor (N, K), "
                         f"got {getattr(w, 'dtype', None)} {tuple(getattr(w, 'shape', ()))}")
    N, K = w.shape
    _check_x("dense_gemv", x, K, w)
    _check_bias("dense_gemv", bias, N, w)
    x2 = _rows(x, K)
    M = x2.shape[0]
    cfg = _resolve(M, x2, config)
    extra = () if bias is None else (bias,)
    if M > GEMV_MAX_ROWS or not can_launch(x, w, *extra):
        return _linear_ref(x, w.float(), bias)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M and N:
        wc = _k_contiguous(w)
        launch = {} if INTERPRETED else dict(num_warps=cfg["num_warps"],
                                             num_stages=cfg["num_stages"])
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _dense_gemv_kernel[(_cdiv(N, cfg["block_n"]),)](
                x2, wc, bias if bias is not None else y, y, M, N, K, x2.stride(0), wc.stride(0),
                HAS_BIAS=bias is not None, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
                BLOCK_K=8 * cfg["block_b"], **launch)
    return y.reshape(*x.shape[:-1], N)


# ====================================================================== module
class Sparse24Linear(nn.Module):
    """An inference-only nn.Linear whose 2:4 sparse weight is stored compressed.

    Buffers: ``values`` (out, in // 2), ``meta`` (out, in // 8) uint8 (see
    :func:`compress_24`) and ``bias`` (out,) or None. forward(x (..., in)) ->
    (..., out) in x's dtype: the Triton GEMV (:func:`sparse24_matmul`) for at
    most :data:`GEMV_MAX_ROWS` rows, else the weight decompressed
    (:func:`reference.decompress_24_ref`) and torch's matmul in x's dtype
    (prefill: tensor cores, and exactly the dense layer's result).
    """

    def __init__(self, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        N, K = check_sparse24(values, meta)
        _check_bias("Sparse24Linear", bias, N, values)
        self.in_features, self.out_features = K, N
        self.register_buffer("values", values.contiguous())
        self.register_buffer("meta", meta.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Sparse24Linear":
        """Compress an nn.Linear whose weight is already 2:4 sparse (see
        :func:`compress_24` for what it requires and raises)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"Sparse24Linear.from_linear needs an nn.Linear, got "
                             f"{type(linear).__name__}")
        values, meta = compress_24(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(values, meta, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1]) if x.dim() else 0
        if rows <= GEMV_MAX_ROWS:
            return sparse24_matmul(x, self.values, self.meta, self.bias)
        _check_x("Sparse24Linear", x, self.in_features, self.values)
        return nn.functional.linear(x, decompress_24_ref(self.values, self.meta), self.bias)

    def weight_bytes(self) -> int:
        """Bytes of the stored weight: values plus metadata (the bias not counted)."""
        return (self.values.numel() * self.values.element_size()
                + self.meta.numel() * self.meta.element_size())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.values.dtype}, "
                f"weight_bytes={self.weight_bytes()}")


# ====================================================================== torch's sparse tensor cores
def to_semi_structured(linear: nn.Linear) -> nn.Linear:
    """A copy of ``linear`` whose 2:4 sparse weight is torch's
    ``SparseSemiStructuredTensor`` (:func:`torch.sparse.to_sparse_semi_structured`),
    so its matmuls run on the sparse tensor cores. The input is not modified.

    Needs a CUDA GPU of compute capability >= 8.0 and a float16 or bfloat16
    weight on it (torch's own shape rules apply too: e.g. both dimensions
    multiples of 64 for fp16/bf16 with the CUTLASS backend). Raises ValueError
    elsewhere, or when the weight is not 2:4 sparse.
    """
    import copy

    if not isinstance(linear, nn.Linear):
        raise ValueError(f"to_semi_structured needs an nn.Linear, got {type(linear).__name__}")
    w = linear.weight
    if not (w.is_cuda and torch.cuda.is_available()):
        raise ValueError("to_semi_structured needs the layer on a CUDA GPU of compute capability "
                         f">= 8.0 (sparse tensor cores), got a weight on {w.device}")
    cc = torch.cuda.get_device_capability(w.device)
    if cc < (8, 0):
        raise ValueError(f"to_semi_structured needs compute capability >= 8.0 (Ampere or newer), "
                         f"this GPU has {cc[0]}.{cc[1]}")
    if w.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"to_semi_structured needs a float16 or bfloat16 weight, got {w.dtype}")
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):  # pragma: no cover - torch < 2.1
        raise ValueError(f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured")
    compress_24(w.detach())  # the 2:4 check, with its message (torch would not check)
    out = copy.deepcopy(linear)
    out.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(w.detach()),
                              requires_grad=False)
    return out


__all__ = ["compress_24", "decompress_24", "check_sparse24", "sparse24_matmul", "sparse24_gemv",
           "dense_gemv", "choose_config", "Sparse24Linear", "to_semi_structured",
           "GEMV_MAX_ROWS"]
