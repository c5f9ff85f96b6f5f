"""Flash attention (forward) in Triton: attention in tiles, never the T x S matrix.

Naive attention writes the whole (T x S) score matrix to memory, reads it back
for the softmax and again for the product with V. Here one program owns a tile
of BLOCK_M query rows of one head and keeps it on-chip (registers/shared
memory) with three running quantities per row: the maximum score ``m``, the
sum of exponentials ``l`` and the unnormalised output ``acc`` (BLOCK_M x D).
It streams K and V through in tiles of BLOCK_N keys and updates them with the
online-softmax recurrence (see :func:`reference.online_softmax_attention_ref`):
memory traffic is O(T*D + S*D) per head instead of O(T*S).

Grid: (ceil(T / BLOCK_M), B * Hq). Query head h reads KV head ``h // group``
(grouped-query attention without copying K and V per query head).

Causality is by position, our convention (see :mod:`llmopt_lab.attention`):
per sequence b, query row i sits at position ``q_start[b] + i`` and the keys
are positions ``0 .. k_len[b] - 1`` (slots beyond are ignored: padding, empty
cache slots). A query at position p sees keys j <= p (and j > p - window with
a sliding window). This covers

* a plain forward (q_start = 0, k_len = T),
* a right-padded batch of prompts (q_start = 0, k_len = lengths),
* chunked prefill / verification against a cache whose slot j holds position j
  (q_start = cache length before the step, k_len = length after it).

To skip work, each program runs over only the key tiles some row of its tile
can see, and applies the mask only to the tiles on the diagonal, at the ends
of the window or at the end of the keys; the tiles every row sees in full run
unmasked.

Reference: :func:`reference.attention_ref` (and the online-softmax version).
The plain API is :func:`flash_attention`; the model uses it through
``attn_fn="flash"`` (:func:`llmopt_lab.attention.flash_attention_fn`).
"""

from __future__ import annotations

import functools

import torch

from . import HAS_TRITON, INTERPRETED, can_launch
from .reference import causal_mask, online_softmax_attention_ref

SUPPORTED_HEAD_DIMS = (32, 64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634  # scores are scaled by log2(e) so that the kernel can use exp2
#: tiles under the interpreter (on a GPU the autotuner picks them)
INTERPRETER_BLOCK_M = 16
INTERPRETER_BLOCK_N = 16

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _flash_fwd_kernel(Q, K, V, O, LSE, Q_START, K_LEN,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks,
                          stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_ot,
                          T, S, H, GROUP, qk_scale, window, SEQ_BUCKET,
                          HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                          DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # SEQ_BUCKET is unused here: it is a key of the autotuner (one tuning per
        # power-of-two length, not per length)
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        kvh = h // GROUP  # GQA: the KV head this query head reads
        q_start = tl.load(Q_START + b)
        kv_end = tl.minimum(tl.load(K_LEN + b), S)  # keys 0 .. kv_end - 1 exist

        m_start = pid_m * BLOCK_M
        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        # 64-bit base offsets: a long KV cache can exceed 2**31 elements
        q_ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                  + offs_m[:, None] * stride_qt + offs_d[None, :])
        k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
        q = tl.load(q_ptrs, mask=offs_m[:, None] < T, other=0.0)  # (BLOCK_M, D), stays on-chip
        pos = q_start + offs_m  # position of each query row

        # Key range [lo, hi) that some row of this tile sees, and the part
        # [full_lo, full_hi) that every row sees (no mask needed there).
        p_first = q_start + m_start
        p_last = q_start + tl.minimum(m_start + BLOCK_M, T) - 1
        hi = kv_end
        full_hi = kv_end
        if CAUSAL:
            hi = tl.minimum(hi, p_last + 1)
            full_hi = tl.minimum(full_hi, p_first + 1)
        lo = p_first * 0
        full_lo = p_first * 0
        if HAS_WINDOW:
            lo = tl.maximum(p_first - window + 1, 0)
            full_lo = tl.maximum(p_last - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        # whole tiles inside [full_lo, full_hi): rounded inwards
        u_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
        u_hi = (tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N
        empty = u_lo >= u_hi
        u_lo = tl.where(empty, lo, u_lo)
        u_hi = tl.where(empty, lo, u_hi)

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max (base-2 units)
        l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2(s - m_i)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)  # running sum of exp2(s - m_i) @ V

        # stage 0: masked tiles at the window's start; 1: unmasked; 2: masked tiles at
        # the diagonal / end of the keys. Unrolled at compile time (stage is a constexpr).
        for stage in tl.static_range(3):
            if stage == 0:
                start = lo
                end = u_lo
            elif stage == 1:
                start = u_lo
                end = u_hi
            else:
                start = u_hi
                end = hi
            if stage != 0 or HAS_WINDOW:
                for start_n in range(start, end, BLOCK_N):
                    offs_k = start_n + offs_n
                    k_ptrs = k_base + offs_k[:, None] * stride_ks + offs_d[None, :]
                    v_ptrs = v_base + offs_k[:, None] * stride_vs + offs_d[None, :]
                    if stage == 1:
                        k = tl.load(k_ptrs)  # (BLOCK_N, D)
                        v = tl.load(v_ptrs)
                    else:
                        k = tl.load(k_ptrs, mask=offs_k[:, None] < kv_end, other=0.0)
                        v = tl.load(v_ptrs, mask=offs_k[:, None] < kv_end, other=0.0)
                    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
                    if stage != 1:
                        visible = offs_k[None, :] < kv_end
                        if CAUSAL:
                            visible = visible & (offs_k[None, :] <= pos[:, None])
                        if HAS_WINDOW:
                            visible = visible & (offs_k[None, :] > pos[:, None] - window)
                        s = tl.where(visible, s, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, 1))
                    # rows that have seen no key yet: subtract 0, not -inf (no nan)
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    alpha = tl.exp2(m_i - m_safe)
                    p = tl.exp2(s - m_safe[:, None])
                    l_i = l_i * alpha + tl.sum(p, 1)
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v,
                                                        input_precision=DOT_PRECISION)
                    m_i = m_new

        seen = l_i > 0.0
        l_safe = tl.where(seen, l_i, 1.0)
        out = acc / l_safe[:, None]  # rows with no visible key: acc = 0 -> 0
        # back from base-2 to natural log: ln(x) = log2(x) * ln(2)
        lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        o_ptrs = (O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                  + offs_m[:, None] * stride_ot + offs_d[None, :])
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < T)
        tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)

    def _fwd_configs():
        # (BLOCK_M, BLOCK_N, num_warps, num_stages); configs that do not fit a
        # device (shared memory) are skipped by the autotuner
        shapes = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3),
                  (64, 32, 4, 2), (32, 32, 4, 2)]
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                for bm, bn, w, s in shapes]

    _tuned_kernel = []

    def _flash_fwd_tuned():
        """The autotuned kernel, built on first use (older Tritons look for a GPU
        driver when an autotuner is created, so not at import)."""
        if not _tuned_kernel:
            _tuned_kernel.append(triton.autotune(
                configs=_fwd_configs(),
                key=["SEQ_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_WINDOW", "DOT_PRECISION"],
            )(_flash_fwd_kernel))
        return _tuned_kernel[0]

    COMPILE_SPECS = [
        dict(fn=_flash_fwd_kernel,
             signature={"Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "O": f"*{t}", "LSE": "*fp32",
                        "Q_START": "*i32", "K_LEN": "*i32",
                        **{f"stride_{x}{y}": "i32" for x in "qkvo" for y in "bh"},
                        "stride_qt": "i32", "stride_ks": "i32", "stride_vs": "i32",
                        "stride_ot": "i32", "T": "i32", "S": "i32", "H": "i32", "GROUP": "i32",
                        "qk_scale": "fp32", "window": "i32", "SEQ_BUCKET": "i32",
                        "HEAD_DIM": "constexpr", "CAUSAL": "constexpr",
                        "HAS_WINDOW": "constexpr", "DOT_PRECISION": "constexpr",
                        "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
             constexprs={"HEAD_DIM": d, "CAUSAL": causal, "HAS_WINDOW": win,
                         "DOT_PRECISION": "ieee" if t == "fp32" else "tf32",
                         "BLOCK_M": bm, "BLOCK_N": bn})
        for t, d, causal, win, bm, bn in [("fp16", 128, True, False, 128, 64),
                                          ("bf16", 64, False, False, 128, 64),
                                          ("fp32", 32, True, True, 64, 32)]
    ]


def _check_qkv(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """ValueError unless q (B, Hq, T, D), k and v (B, Hkv, S, D) fit a kernel."""
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: {label} must be a 4-D tensor (batch, heads, tokens, "
                             f"head_dim), got {shape}")
    if k.shape != v.shape:
        raise ValueError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in "
                         "batch and head_dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"{name}: {q.shape[1]} query heads are not a multiple of "
                         f"{k.shape[1]} KV heads")
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{name}: head_dim {q.shape[3]} is not supported; supported: "
                         f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: unsupported dtype {q.dtype}; use float32, float16 or bfloat16")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}: q, k, v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on these tensors here (shapes, dtypes,
    head_dim, and a device the current Triton mode can launch on)."""
    try:
        _check_qkv("flash", q, k, v)
    except ValueError:
        return False
    return can_launch(q, k, v)


def per_sequence(name: str, value, batch: int, device: torch.device,
                 nonnegative: bool = False) -> torch.Tensor:
    """An int or a (B,) integer tensor -> (B,) int32 on ``device``. With
    ``nonnegative`` (lengths), negative values raise ValueError for ints and
    CPU tensors; a CUDA tensor's values are not read (that would cost a host
    sync every decode step, and break CUDA-graph capture). Positions such as
    q_start may be negative (queries before the first key see nothing)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(f"{name} must have shape ({batch},), got {tuple(value.shape)}")
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but q on {device}")
        if nonnegative and value.device.type == "cpu" and value.numel() and int(value.min()) < 0:
            raise ValueError(f"{name} must be >= 0, got {value.tolist()}")
        return value.to(torch.int32)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int or a ({batch},) tensor, got {value!r}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return torch.full((batch,), value, dtype=torch.int32, device=device)


def prefix_mask(q_start: torch.Tensor, k_len: torch.Tensor, T: int, S: int, causal: bool = True,
                window: int | None = None) -> torch.Tensor:
    """The (B, 1, T, S) bool mask the kernels implement: query i of sequence b
    at position q_start[b] + i; keys at positions 0..S-1, valid below k_len[b]."""
    B = q_start.shape[0]
    dev = q_start.device
    k_pos = torch.arange(S, device=dev).expand(B, S)
    k_valid = k_pos < k_len.long()[:, None]
    if not causal:
        return k_valid[:, None, None, :].expand(B, 1, T, S)
    q_pos = q_start.long()[:, None] + torch.arange(T, device=dev)
    return causal_mask(q_pos, k_pos, k_valid, window)


def ranges_from_positions(q_pos: torch.Tensor, k_pos: torch.Tensor,
                          k_valid: torch.Tensor | None = None):
    """Per-sequence (q_start, k_len), each (B,) int32, from explicit positions,
    or None when they lack the structure the kernels need.

    Needed: consecutive query positions (q_pos[b] = q_pos[b, 0] + 0..T-1), keys
    at positions 0..S-1 in order (k_pos[b, j] = j, as in a static cache), and
    valid keys forming a prefix (k_valid[b, j] = j < k_len[b]). Costs one host
    synchronisation (reading the check's result).
    """
    B, T = q_pos.shape
    S = k_pos.shape[1]
    if T == 0 or k_pos.shape[0] != B or (k_valid is not None and k_valid.shape != k_pos.shape):
        return None
    dev = q_pos.device
    q_start = q_pos[:, 0]
    steps_s = torch.arange(S, device=dev)
    ok = (q_pos == q_start[:, None] + torch.arange(T, device=dev)).all() & (k_pos == steps_s).all()
    if k_valid is None:
        k_len = torch.full((B,), S, dtype=torch.int32, device=dev)
    else:
        k_len = k_valid.sum(1)
        ok &= (k_valid == (steps_s < k_len[:, None])).all()
    if not bool(ok):
        return None
    return q_start.to(torch.int32), k_len.to(torch.int32)


@functools.lru_cache(maxsize=None)
def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs: true float32 products ("ieee"), not TF32 tensor cores that
    # would silently round the inputs to 10 mantissa bits
    return "ieee" if dtype == torch.float32 else "tf32"


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    scale: float | None = None, q_start=None, k_len=None,
                    window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-attention forward with our Triton kernel; returns ``(out, lse)``.

    q: (B, Hq, T, D); k, v: (B, Hkv, S, D) with Hq a multiple of Hkv (query
    head h reads KV head h // (Hq // Hkv)); D in 32, 64, 128; float32,
    float16 or bfloat16 (float32 matmuls in true float32, not TF32); any
    strides with the last dimension contiguous (others are copied).
    scale: score scale, default D ** -0.5.
    k_len: int or (B,) ints, valid keys per sequence (keys 0..k_len-1; default
        S; values above S are clamped).
    q_start: int or (B,) ints, position of query row 0 (rows are consecutive);
        default ``k_len - T``: the queries are the last T keys (bottom-right
        aligned). For right-padded prompts pass ``q_start=0``.
    causal: a query at position p sees keys j <= p; False: every valid key.
    window: sliding window (causal only): also require j > p - window.

    Returns out (B, Hq, T, D) in q's dtype and lse (B, Hq, T) float32, the
    natural log of each row's softmax denominator (-inf, and out = 0, for a
    row that sees no key). Falls back to the plain-torch reference where no
    kernel can run (no Triton; CPU tensors on a GPU machine).
    Raises ValueError on bad shapes, dtypes, head dims, devices or arguments.
    """
    _check_qkv("flash_attention", q, k, v)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if window is not None:
        if not causal:
            raise ValueError("flash_attention: a sliding window needs causal=True")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"flash_attention: window must be a positive int, got {window!r}")
    scale = D ** -0.5 if scale is None else float(scale)
    k_len_t = per_sequence("k_len", S if k_len is None else k_len, B, q.device, nonnegative=True)
    q_start_t = (k_len_t.clamp(max=S) - T if q_start is None
                 else per_sequence("q_start", q_start, B, q.device))

    if not can_launch(q, k, v):
        return online_softmax_attention_ref(
            q, k, v, prefix_mask(q_start_t, k_len_t, T, S, causal, window), scale,
            block_size=128, return_lse=True)

    out = torch.empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    args = (q, k, v, out, lse, q_start_t, k_len_t,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            T, S, Hq, Hq // Hkv, scale * LOG2E, window or 0,
            min(triton.next_power_of_2(max(T, S)), 1 << 16))
    consts = dict(HEAD_DIM=D, CAUSAL=bool(causal), HAS_WINDOW=window is not None,
                  DOT_PRECISION=_dot_precision(q.dtype))
    if INTERPRETED:
        grid = (triton.cdiv(T, INTERPRETER_BLOCK_M), B * Hq)
        _flash_fwd_kernel[grid](*args, **consts, BLOCK_M=INTERPRETER_BLOCK_M,
                                BLOCK_N=INTERPRETER_BLOCK_N)
    else:
        def grid(meta):
            return (triton.cdiv(T, meta["BLOCK_M"]), B * Hq)

        with torch.cuda.device(q.device):
            _flash_fwd_tuned()[grid](*args, **consts)
    return out, lse
