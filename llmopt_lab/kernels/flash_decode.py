"""Flash decoding in Triton: a few queries against a long KV cache, split along the keys.

At decode time each sequence has 1 new query (or up to 16 when verifying
draft tokens) but thousands of cached keys. The prefill kernel's grid
(query tiles x heads) would then launch only B * Hq programs, each walking
the whole cache alone: most of the GPU idles. Flash decoding splits the key
range of each sequence into ``num_splits`` chunks handled by different
programs, each producing a partial result normalised by its own softmax sum
plus its log-sum-exp; a second small kernel combines the partials exactly:

    lse = log(sum_s exp(lse_s)),   out = sum_s exp(lse_s - lse) * out_s

Kernel 1, grid (num_splits, B * Hkv * head_blocks): one program takes one KV
head and packs the queries of (a block of) the query heads that read it, all
T of them, into one tile of rows (row = head-in-group * T + query), so every
K/V tile is loaded from memory once per group instead of once per query head.
The tile has at least 16 rows (tensor cores need it); on-chip are the query
tile, one K and V tile and the running max/sum/accumulator of each row.
Kernel 2, grid (B * Hq * T,): combines the partials of one query row.

Causal by position, aligned bottom-right: with the default ``q_start``, query
i of T sits at position ``k_len - T + i`` and sees the keys at positions <= its
own (cache slot j holds position j, as in :class:`llmopt_lab.cache.StaticCache`).
Reference: :func:`reference.attention_ref` with that mask.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from . import HAS_TRITON, INTERPRETED, can_launch
from .flash_attention import LOG2E, _check_qkv, _dot_precision, per_sequence, prefix_mask
from .reference import online_softmax_attention_ref

#: at most this many queries per sequence and step
MAX_QUERIES = 16
#: at most this many rows (query heads x queries) in one program's tile
MAX_ROWS = 64
MAX_SPLITS = 64
INTERPRETER_BLOCK_N = 16

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _attend_tile(q, k, v, offs_k, k_ok, pos, window, m_i, l_i, acc, qk_scale,
                     HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """One tile of keys k, v (BLOCK_N, D) at positions offs_k (k_ok: loaded)
        for query rows q (BLOCK_M, D) at positions pos: causal (and windowed)
        scores, then the online-softmax update of the running max m_i, sum l_i
        and output acc. Shared by flash decoding and the paged kernels (lesson
        06's flash_attention keeps the same lines inline: the lesson reads them)."""
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = k_ok[None, :] & (offs_k[None, :] <= pos[:, None])
        if HAS_WINDOW:
            visible = visible & (offs_k[None, :] > pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows that have seen no key yet: subtract 0, not -inf (no nan)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _store_partial(O_PART, LSE_PART, row, acc, l_i, m_i, row_ok, offs_d,
                       HEAD_DIM: tl.constexpr):
        """A split's normalised output and its log-sum-exp (natural log) at
        partial rows ``row``, for the combine kernel; a row that saw no key
        stores 0 and -inf (it then weighs nothing)."""
        seen = l_i > 0.0
        l_safe = tl.where(seen, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(O_PART + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
        tl.store(LSE_PART + row, lse, mask=row_ok)

    @triton.jit
    def _flash_decode_kernel(Q, K, V, O_PART, LSE_PART, Q_START, K_LEN,
                             stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks,
                             stride_vb, stride_vh, stride_vs,
                             T, S, HKV, GROUP, HEADS_PER_PROG, NUM_SPLITS, qk_scale, window,
                             HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr,
                             DOT_PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        split = tl.program_id(0)
        pid = tl.program_id(1)
        head_blocks = tl.cdiv(GROUP, HEADS_PER_PROG)
        hblock = pid % head_blocks
        kvh = (pid // head_blocks) % HKV
        b = pid // (head_blocks * HKV)

        # rows of the tile: (query head of this KV group, query index)
        rows = tl.arange(0, BLOCK_M)
        g = hblock * HEADS_PER_PROG + rows // T
        t = rows % T
        row_ok = (rows < HEADS_PER_PROG * T) & (g < GROUP)
        h = kvh * GROUP + g  # query head of each row
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)

        q_start = tl.load(Q_START + b)
        kv_end = tl.minimum(tl.load(K_LEN + b), S)
        pos = q_start + t  # position of each row's query
        # keys some row sees: [lo, hi); split them into NUM_SPLITS chunks of whole tiles
        hi = tl.minimum(kv_end, q_start + T)
        lo = q_start * 0
        if HAS_WINDOW:
            lo = (tl.maximum(q_start - window + 1, 0) // BLOCK_N) * BLOCK_N
        chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = lo + split * chunk
        end = tl.minimum(start + chunk, hi)

        q_ptrs = (Q + b.to(tl.int64) * stride_qb + h[:, None].to(tl.int64) * stride_qh
                  + t[:, None] * stride_qt + offs_d[None, :])
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
        k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        for start_n in range(start, end, BLOCK_N):
            offs_k = start_n + offs_n
            k_ok = offs_k < end
            k = tl.load(k_base + offs_k[:, None] * stride_ks + offs_d[None, :],
                        mask=k_ok[:, None], other=0.0)  # (BLOCK_N, D), shared by the group
            v = tl.load(v_base + offs_k[:, None] * stride_vs + offs_d[None, :],
                        mask=k_ok[:, None], other=0.0)
            m_i, l_i, acc = _attend_tile(q, k, v, offs_k, k_ok, pos, window, m_i, l_i, acc,
                                         qk_scale, HAS_WINDOW, DOT_PRECISION)

        # partials: (B, Hq, T, NUM_SPLITS, D) and (B, Hq, T, NUM_SPLITS), float32
        row = ((b * HKV * GROUP + h).to(tl.int64) * T + t) * NUM_SPLITS + split
        _store_partial(O_PART, LSE_PART, row, acc, l_i, m_i, row_ok, offs_d, HEAD_DIM)

    @triton.jit
    def _flash_decode_combine_kernel(O_PART, LSE_PART, O, LSE, NUM_SPLITS,
                                     HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)  # one query row (b, h, t)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, HEAD_DIM)
        s_ok = offs_s < NUM_SPLITS
        lse_s = tl.load(LSE_PART + r * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
        m = tl.max(lse_s, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp(lse_s - m_safe)  # 0 for splits that saw no key
        total = tl.sum(w, 0)
        o_s = tl.load(O_PART + (r * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                      mask=s_ok[:, None], other=0.0)  # (BLOCK_S, D)
        total_safe = tl.where(total > 0.0, total, 1.0)
        out = tl.sum(o_s * w[:, None], 0) / total_safe
        tl.store(O + r * HEAD_DIM + offs_d, out.to(O.dtype.element_ty))
        tl.store(LSE + r, tl.where(total > 0.0, m_safe + tl.log(total_safe), float("-inf")))

    _DECODE_SIG = {"Q": "*{t}", "K": "*{t}", "V": "*{t}", "O_PART": "*fp32", "LSE_PART": "*fp32",
                   "Q_START": "*i32", "K_LEN": "*i32",
                   **{f"stride_{x}{y}": "i32" for x in "qkv" for y in "bh"},
                   "stride_qt": "i32", "stride_ks": "i32", "stride_vs": "i32",
                   "T": "i32", "S": "i32", "HKV": "i32", "GROUP": "i32", "HEADS_PER_PROG": "i32",
                   "NUM_SPLITS": "i32", "qk_scale": "fp32", "window": "i32",
                   "HEAD_DIM": "constexpr", "HAS_WINDOW": "constexpr",
                   "DOT_PRECISION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    JIT_HELPERS = [_attend_tile, _store_partial]

    COMPILE_SPECS = [
        dict(fn=_flash_decode_kernel,
             signature={name: sig.format(t=t) for name, sig in _DECODE_SIG.items()},
             constexprs={"HEAD_DIM": d, "HAS_WINDOW": win, "BLOCK_M": bm, "BLOCK_N": bn,
                         "DOT_PRECISION": "ieee" if t == "fp32" else "tf32"})
        for t, d, win, bm, bn in [("fp16", 128, False, 16, 64), ("bf16", 64, True, 64, 64),
                                  ("fp32", 32, False, 32, 32)]
    ] + [
        dict(fn=_flash_decode_combine_kernel,
             signature={"O_PART": "*fp32", "LSE_PART": "*fp32", "O": f"*{t}", "LSE": "*fp32",
                        "NUM_SPLITS": "i32", "HEAD_DIM": "constexpr", "BLOCK_S": "constexpr"},
             constexprs={"HEAD_DIM": 128, "BLOCK_S": 16})
        for t in ("fp16", "bf16", "fp32")
    ]


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_num_splits(programs: int, S: int, device: torch.device) -> int:
    """Splits of the key range so that the grid fills the device: about two
    programs per SM on a GPU, each split keeping >= 256 keys (of the cache's
    capacity S: the per-sequence lengths stay on the device, unread). Under the
    interpreter: chunks of >= 32 keys, at most 4 splits."""
    if device.type == "cuda":
        want = -(-2 * _num_sms(device.index or 0) // max(programs, 1))
        return max(1, min(want, -(-S // 256), MAX_SPLITS))
    return max(1, min(4, S // 32))


def flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_len,
                 scale: float | None = None, num_splits: int | None = None, q_start=None,
                 window: int | None = None, return_lse: bool = False):
    """Attention of a few queries per sequence against a KV cache (flash decoding).

    q: (B, Hq, T, D) with 1 <= T <= 16; k_cache, v_cache: (B, Hkv, S, D), slot j
    holding position j (e.g. one layer of a StaticCache); Hq a multiple of Hkv;
    D in 32, 64, 128; float32 / float16 / bfloat16.
    k_len: int or (B,) ints, filled slots per sequence (values above S clamp).
    q_start: int or (B,) ints, position of query 0; default ``k_len - T``
        (the queries are the last T tokens written: bottom-right aligned).
    Query i sees slots j <= q_start + i, j < k_len (and j > q_start + i - window).
    num_splits: chunks of the key range per sequence (default: enough programs
        to fill the device; see :func:`default_num_splits`).
    Returns out (B, Hq, T, D) in q's dtype (rows that see no key: zeros), and
    with ``return_lse`` also lse (B, Hq, T) float32.
    Falls back to the plain-torch reference where no kernel can run.
    Raises ValueError on bad shapes, dtypes, head dims, devices or arguments.
    """
    _check_qkv("flash_decode", q, k_cache, v_cache)
    B, Hq, T, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if not 1 <= T <= MAX_QUERIES:
        raise ValueError(f"flash_decode: takes 1 to {MAX_QUERIES} queries per sequence, got "
                         f"{T}; use flash_attention for longer ones")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ValueError(f"flash_decode: window must be a positive int, got {window!r}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"flash_decode: num_splits must be an int in 1..{MAX_SPLITS}, "
                         f"got {num_splits!r}")
    scale = D ** -0.5 if scale is None else float(scale)
    k_len_t = per_sequence("k_len", k_len, B, q.device, nonnegative=True)
    q_start_t = (k_len_t.clamp(max=S) - T if q_start is None
                 else per_sequence("q_start", q_start, B, q.device))

    if not can_launch(q, k_cache, v_cache):
        out, lse = online_softmax_attention_ref(
            q, k_cache, v_cache, prefix_mask(q_start_t, k_len_t, T, S, True, window), scale,
            block_size=128, return_lse=True)
        return (out, lse) if return_lse else out

    out = torch.empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return (out, lse) if return_lse else out
    group = Hq // Hkv
    heads_per_prog = max(1, min(group, MAX_ROWS // T))
    head_blocks = triton.cdiv(group, heads_per_prog)
    programs = B * Hkv * head_blocks
    splits = num_splits or default_num_splits(programs, S, q.device)
    block_m = max(16, triton.next_power_of_2(heads_per_prog * T))
    if INTERPRETED:
        block_n, launch = INTERPRETER_BLOCK_N, {}
    else:  # fixed tiles: decode is memory-bound, the chunking matters more than the tile
        block_n = 64 if D * q.element_size() <= 256 else 32
        launch = dict(num_warps=4 if block_m <= 32 else 8, num_stages=2)
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous()
                           for t in (q, k_cache, v_cache))
    o_part = torch.empty((B, Hq, T, splits, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B, Hq, T, splits), dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _flash_decode_kernel[(splits, programs)](
            q, k_cache, v_cache, o_part, lse_part, q_start_t, k_len_t,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            T, S, Hkv, group, heads_per_prog, splits, scale * LOG2E, window or 0,
            HEAD_DIM=D, HAS_WINDOW=window is not None, DOT_PRECISION=_dot_precision(q.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, **launch)
        _flash_decode_combine_kernel[(B * Hq * T,)](
            o_part, lse_part, out, lse, splits, HEAD_DIM=D,
            BLOCK_S=max(2, triton.next_power_of_2(splits)))
    return (out, lse) if return_lse else out
