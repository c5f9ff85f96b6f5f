"""Paged attention in Triton: packed queries against a KV cache stored in blocks.

A serving engine does not keep one contiguous cache per sequence: the KV pool
is ``num_blocks`` blocks of ``block_size`` slots per layer, shape
``(num_blocks, Hkv, block_size, D)``, and each sequence owns a list of blocks
(its row of ``block_tables``). Position p of sequence s lives in block
``block_tables[s, p // block_size]`` at offset ``p % block_size``. The kernels
read the blocks in place: no gather into a contiguous copy first.

The queries of one step are packed, (N, Hq, D): sequence s owns rows
``query_start[s]:query_start[s + 1]`` (n_s of them), its LAST n_s positions
``context_lens[s] - n_s .. context_lens[s] - 1``, whose keys are already in the
cache. One step can mix decode (n_s = 1), draft verification (n_s = k + 1),
chunked prefill and prompts that hit the prefix cache (n_s = the new tokens).
Causal by position: a query at position p sees keys j <= p (and j > p - window
with a sliding window); query head h reads KV head h // (Hq // Hkv).

Each program walks the key positions in tiles of BLOCK_N keys, BLOCK_N a
power of two that divides block_size, so a tile never straddles two blocks:
one block-table entry per tile, then a contiguous (BLOCK_N, D) load.

Two kernels, chosen by the host int ``max_queries`` (never by reading the
device: a CUDA graph may capture the call):

* decode (max_queries <= 16): split-KV flash decoding, as in
  :mod:`.flash_decode`. Grid (num_splits, S * Hkv * head_blocks): one program
  takes one sequence, one KV head and the rows (query head of the group x
  query) that read it, and one of ``num_splits`` chunks of the sequence's key
  range; it writes a partial output and its log-sum-exp. The combine kernel of
  :mod:`.flash_decode` merges the partials exactly.
* prefill: grid (ceil(max_queries / BLOCK_M), S * Hq): one program per
  (query tile, sequence, query head), online softmax over the tiles of keys
  some row of its tile can see (flash attention over blocks).

Reference: :func:`reference.paged_attention_ref`.
"""

from __future__ import annotations

import contextlib

import torch

from . import HAS_TRITON, INTERPRETED, can_launch
from .flash_attention import LOG2E, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, _dot_precision
from .flash_decode import MAX_ROWS, MAX_SPLITS, default_num_splits
from .reference import paged_attention_ref

#: block sizes (slots per block) the kernels take: powers of two in this range
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 16, 128
#: up to this many queries per sequence the split-KV decode kernel runs
DECODE_MAX_QUERIES = 16
#: tiles under the interpreter
INTERPRETER_BLOCK_M = 16
INTERPRETER_BLOCK_N = 16

if HAS_TRITON:
    from .flash_decode import _attend_tile, _flash_decode_combine_kernel, _store_partial

    import triton
    import triton.language as tl

    @triton.jit
    def _paged_decode_kernel(Q, K, V, O_PART, LSE_PART, BLOCK_TABLES, CONTEXT_LENS, QUERY_START,
                             stride_qn, stride_qh, stride_kb, stride_kh, stride_ks,
                             stride_vb, stride_vh, stride_vs, stride_bt,
                             T, HKV, GROUP, HEADS_PER_PROG, NUM_SPLITS, MAX_BLOCKS, qk_scale,
                             window,
                             HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                             HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        split = tl.program_id(0)
        pid = tl.program_id(1)
        head_blocks = tl.cdiv(GROUP, HEADS_PER_PROG)
        hblock = pid % head_blocks
        kvh = (pid // head_blocks) % HKV
        seq = pid // (head_blocks * HKV)

        q0 = tl.load(QUERY_START + seq).to(tl.int32)
        n_q = tl.load(QUERY_START + seq + 1).to(tl.int32) - q0  # queries of this sequence
        ctx = tl.load(CONTEXT_LENS + seq).to(tl.int32)

        # rows of the tile: (query head of this KV group, query index); T = max queries
        rows = tl.arange(0, BLOCK_M)
        g = hblock * HEADS_PER_PROG + rows // T
        t = rows % T
        row_ok = (rows < HEADS_PER_PROG * T) & (g < GROUP) & (t < n_q)
        h = kvh * GROUP + g  # query head of each row
        pos = ctx - n_q + t  # position of each row's query: the last n_q positions
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)

        # keys some row sees: [lo, hi); split them into NUM_SPLITS chunks of whole tiles
        hi = tl.minimum(ctx, MAX_BLOCKS * BLOCK_SIZE)
        lo = ctx * 0
        if HAS_WINDOW:
            lo = (tl.maximum(ctx - n_q - window + 1, 0) // BLOCK_N) * BLOCK_N
        hi = tl.where(n_q > 0, hi, lo)
        chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = lo + split * chunk
        end = tl.minimum(start + chunk, hi)

        q_ptrs = (Q + (q0 + t)[:, None].to(tl.int64) * stride_qn
                  + h[:, None].to(tl.int64) * stride_qh + offs_d[None, :])
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
        table = BLOCK_TABLES + seq.to(tl.int64) * stride_bt
        k_head = K + kvh.to(tl.int64) * stride_kh
        v_head = V + kvh.to(tl.int64) * stride_vh

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        for start_n in range(start, end, BLOCK_N):
            # the whole tile lies in one block (BLOCK_N divides BLOCK_SIZE, start_n is
            # a multiple of BLOCK_N): one table entry, then a contiguous load
            blk = tl.load(table + start_n // BLOCK_SIZE).to(tl.int64)
            slot = start_n % BLOCK_SIZE + offs_n
            offs_k = start_n + offs_n  # positions of the tile's keys
            k_ok = offs_k < end  # slots past the end may hold garbage (even nan): not read
            k = tl.load(k_head + blk * stride_kb + slot[:, None] * stride_ks + offs_d[None, :],
                        mask=k_ok[:, None], other=0.0)  # (BLOCK_N, D), shared by the group
            v = tl.load(v_head + blk * stride_vb + slot[:, None] * stride_vs + offs_d[None, :],
                        mask=k_ok[:, None], other=0.0)
            m_i, l_i, acc = _attend_tile(q, k, v, offs_k, k_ok, pos, window, m_i, l_i, acc,
                                         qk_scale, HAS_WINDOW, DOT_PRECISION)

        # partials: (N, Hq, NUM_SPLITS, D) and (N, Hq, NUM_SPLITS), float32
        row = ((q0 + t).to(tl.int64) * (HKV * GROUP) + h) * NUM_SPLITS + split
        _store_partial(O_PART, LSE_PART, row, acc, l_i, m_i, row_ok, offs_d, HEAD_DIM)

    @triton.jit
    def _paged_prefill_kernel(Q, K, V, O, BLOCK_TABLES, CONTEXT_LENS, QUERY_START,
                              stride_qn, stride_qh, stride_kb, stride_kh, stride_ks,
                              stride_vb, stride_vh, stride_vs, stride_on, stride_oh, stride_bt,
                              HQ, GROUP, MAX_BLOCKS, qk_scale, window,
                              HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                              HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid = tl.program_id(1)
        seq = pid // HQ
        h = pid % HQ
        kvh = h // GROUP  # GQA: the KV head this query head reads

        q0 = tl.load(QUERY_START + seq).to(tl.int32)
        n_q = tl.load(QUERY_START + seq + 1).to(tl.int32) - q0
        ctx = tl.load(CONTEXT_LENS + seq).to(tl.int32)

        m_start = pid_m * BLOCK_M
        offs_m = m_start + tl.arange(0, BLOCK_M)  # query index within the sequence
        row_ok = offs_m < n_q
        pos = ctx - n_q + offs_m  # positions of the queries
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)

        # keys some row of this tile sees: [lo, hi); none for a tile past the queries
        p_first = ctx - n_q + m_start
        p_last = ctx - n_q + tl.minimum(m_start + BLOCK_M, n_q) - 1
        hi = tl.minimum(tl.minimum(ctx, p_last + 1), MAX_BLOCKS * BLOCK_SIZE)
        lo = ctx * 0
        if HAS_WINDOW:
            lo = (tl.maximum(p_first - window + 1, 0) // BLOCK_N) * BLOCK_N
        hi = tl.where(m_start < n_q, hi, lo)

        q_ptrs = (Q + (q0 + offs_m)[:, None].to(tl.int64) * stride_qn
                  + h.to(tl.int64) * stride_qh + offs_d[None, :])
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D), stays on-chip
        table = BLOCK_TABLES + seq.to(tl.int64) * stride_bt
        k_head = K + kvh.to(tl.int64) * stride_kh
        v_head = V + kvh.to(tl.int64) * stride_vh

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max (base-2 units)
        l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2(s - m_i)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)  # running sum of exp2(s - m_i) @ V
        for start_n in range(lo, hi, BLOCK_N):
            blk = tl.load(table + start_n // BLOCK_SIZE).to(tl.int64)
            slot = start_n % BLOCK_SIZE + offs_n
            offs_k = start_n + offs_n
            k_ok = offs_k < hi
            k = tl.load(k_head + blk * stride_kb + slot[:, None] * stride_ks + offs_d[None, :],
                        mask=k_ok[:, None], other=0.0)  # (BLOCK_N, D)
            v = tl.load(v_head + blk * stride_vb + slot[:, None] * stride_vs + offs_d[None, :],
                        mask=k_ok[:, None], other=0.0)
            m_i, l_i, acc = _attend_tile(q, k, v, offs_k, k_ok, pos, window, m_i, l_i, acc,
                                         qk_scale, HAS_WINDOW, DOT_PRECISION)

        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]  # rows with no visible key: acc = 0 -> 0
        o_ptrs = (O + (q0 + offs_m)[:, None].to(tl.int64) * stride_on
                  + h.to(tl.int64) * stride_oh + offs_d[None, :])
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])

    _COMMON_SIG = {"BLOCK_TABLES": "*i64", "CONTEXT_LENS": "*i64", "QUERY_START": "*i64",
                   "stride_qn": "i32", "stride_qh": "i32",
                   **{f"stride_{x}{y}": "i32" for x in "kv" for y in "bhs"}}
    _DECODE_SIG = {"Q": "*{t}", "K": "*{t}", "V": "*{t}", "O_PART": "*fp32", "LSE_PART": "*fp32",
                   **_COMMON_SIG, "stride_bt": "i32",
                   "T": "i32", "HKV": "i32", "GROUP": "i32", "HEADS_PER_PROG": "i32",
                   "NUM_SPLITS": "i32", "MAX_BLOCKS": "i32", "qk_scale": "fp32", "window": "i32",
                   "HEAD_DIM": "constexpr", "BLOCK_SIZE": "constexpr", "HAS_WINDOW": "constexpr",
                   "DOT_PRECISION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    _PREFILL_SIG = {"Q": "*{t}", "K": "*{t}", "V": "*{t}", "O": "*{t}",
                    **_COMMON_SIG, "stride_on": "i32", "stride_oh": "i32", "stride_bt": "i32",
                    "HQ": "i32", "GROUP": "i32", "MAX_BLOCKS": "i32", "qk_scale": "fp32",
                    "window": "i32",
                    "HEAD_DIM": "constexpr", "BLOCK_SIZE": "constexpr", "HAS_WINDOW": "constexpr",
                    "DOT_PRECISION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    # (dtype, head_dim, block_size, window, BLOCK_M, BLOCK_N): the tiles the wrapper picks on a GPU
    JIT_HELPERS = [_attend_tile, _store_partial]  # from flash_decode, compiled within the kernels

    COMPILE_SPECS = [
        dict(fn=fn, signature={name: sig.format(t=t) for name, sig in table.items()},
             constexprs={"HEAD_DIM": d, "BLOCK_SIZE": bs, "HAS_WINDOW": win, "BLOCK_M": bm,
                         "BLOCK_N": bn, "DOT_PRECISION": "ieee" if t == "fp32" else "tf32"})
        for fn, table, cases in [
            (_paged_decode_kernel, _DECODE_SIG,
             [("fp16", 128, 16, False, 16, 16), ("bf16", 64, 128, True, 64, 64),
              ("fp32", 32, 32, False, 32, 32), ("fp32", 128, 64, False, 16, 32)]),
            (_paged_prefill_kernel, _PREFILL_SIG,
             [("fp16", 128, 16, False, 64, 16), ("bf16", 64, 128, True, 64, 64),
              ("fp32", 32, 32, True, 32, 32), ("fp32", 128, 64, False, 64, 32)]),
        ]
        for t, d, bs, win, bm, bn in cases
    ]


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_cache(name: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """ValueError unless q (N, Hq, D) and k_cache, v_cache (num_blocks, Hkv,
    block_size, D) fit the kernels."""
    pool = "(num_blocks, kv_heads, block_size, head_dim)"
    for label, t, dims, what in (("q", q, 3, "(tokens, heads, head_dim)"),
                                 ("k_cache", k_cache, 4, pool), ("v_cache", v_cache, 4, pool)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: {label} must be a {dims}-D tensor {what}, got {shape}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{name}: k_cache {tuple(k_cache.shape)} and v_cache "
                         f"{tuple(v_cache.shape)} differ in shape")
    N, Hq, D = q.shape
    _, Hkv, block_size, Dk = k_cache.shape
    if D != Dk:
        raise ValueError(f"{name}: q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} differ "
                         "in head_dim")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{name}: {Hq} query heads are not a multiple of {Hkv} KV heads")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{name}: head_dim {D} is not supported; supported: "
                         f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}")
    if not (_is_pow2(block_size) and MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE):
        raise ValueError(f"{name}: block_size {block_size} is not supported; use a power of two "
                         f"from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"{name}: q, k_cache, v_cache must share a dtype, got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: unsupported dtype {q.dtype}; use float32, float16 or bfloat16")
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError(f"{name}: q, k_cache, v_cache must be on one device, got {q.device}, "
                         f"{k_cache.device}, {v_cache.device}")


def _check_index(name: str, label: str, t, dims: int, shape: tuple, device) -> torch.Tensor:
    """ValueError unless t is an int32/int64 tensor of ``shape`` (None: any size)
    on ``device``; returns it with a contiguous last dimension."""
    if not isinstance(t, torch.Tensor) or t.dim() != dims:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: {label} must be a {dims}-D tensor, got {got}")
    if any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = tuple("*" if w is None else w for w in shape)
        raise ValueError(f"{name}: {label} must have shape {want}, got {tuple(t.shape)}")
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: {label} must be an int32 or int64 tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: {label} is on {t.device} but q on {device}")
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_ranges(name: str, block_tables: torch.Tensor, context_lens: torch.Tensor,
                  query_start: torch.Tensor, N: int, num_blocks: int) -> None:
    """ValueError for values the kernels would read memory with out of bounds:
    negative context lengths, query_start not rising from 0 to N, block ids
    outside 0..num_blocks-1. Only for CPU tensors (reading CUDA ones costs a
    host sync every step and breaks CUDA-graph capture)."""
    if context_lens.numel() and int(context_lens.min()) < 0:
        raise ValueError(f"{name}: context_lens must be >= 0, got {context_lens.tolist()}")
    qs = query_start.tolist()
    if qs[0] != 0 or qs[-1] != N or any(b < a for a, b in zip(qs, qs[1:])):
        raise ValueError(f"{name}: query_start must rise from 0 to N = {N} (cumulative query "
                         f"counts), got {qs}")
    if block_tables.numel() and (int(block_tables.min()) < 0
                                 or int(block_tables.max()) >= num_blocks):
        raise ValueError(f"{name}: block_tables hold block ids {int(block_tables.min())}.."
                         f"{int(block_tables.max())}, outside the cache's 0..{num_blocks - 1}")


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the paged kernels can run on these tensors here: q (N, Hq, D) and
    k_cache (num_blocks, Hkv, block_size, D) of a supported dtype, head_dim and
    block size, Hq a multiple of Hkv, on a device the current Triton mode can
    launch on (CUDA compiled, or CPU under the interpreter)."""
    try:
        _check_cache("paged_attention", q, k_cache, k_cache)
    except ValueError:
        return False
    return can_launch(q, k_cache)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    query_start: torch.Tensor, max_queries: int, window: int | None = None,
                    scale: float | None = None, *, kernel: str | None = None,
                    num_splits: int | None = None) -> torch.Tensor:
    """Attention of packed queries against a paged KV cache (Triton).

    q: (N, Hq, D), the queries of S sequences packed: sequence s owns rows
        ``query_start[s]:query_start[s + 1]``, its last n_s positions
        ``context_lens[s] - n_s .. context_lens[s] - 1`` (their keys already
        written to the cache). ``query_start[S]`` must be N.
    k_cache, v_cache: (num_blocks, Hkv, block_size, D), one layer of the pool;
        block_size a power of two in 16..128; Hq a multiple of Hkv (query head h
        reads KV head h // (Hq // Hkv)); D in 32, 64, 128; float32 (true float32
        products, not TF32), float16 or bfloat16, softmax in float32.
    block_tables: (S, max_blocks) int32/int64, position p of sequence s in block
        ``block_tables[s, p // block_size]`` at offset ``p % block_size``
        (entries past the sequence's length are not read).
    context_lens: (S,) int32/int64 keys of each sequence (values above
        max_blocks * block_size clamp); query_start: (S + 1,) int32/int64.
    max_queries: host int >= max n_s (more is correct, only slower; less leaves
        the extra queries uncomputed). It picks the kernel and the grid: no
        device value is read, so a CUDA graph can capture the call.
    window: sliding window, a query at p sees keys p - window < j <= p.
    scale: score scale, default D ** -0.5.
    kernel: "decode" (split-KV, up to 16 queries per sequence), "prefill", or
        None: decode when max_queries <= 16, else prefill.
    num_splits: decode only, chunks of each sequence's keys (default: enough
        programs to fill the device).

    Returns (N, Hq, D) in q's dtype (a row that sees no key: zeros). Falls back
    to :func:`reference.paged_attention_ref` where no kernel can run (it reads
    the device). Raises ValueError on bad shapes, dtypes, head dims, block
    sizes, devices or arguments; for CPU tensors also on negative
    context_lens, a query_start that does not rise from 0 to N, or block ids
    outside the cache (CUDA tensors' values are not read: no host sync).
    """
    name = "paged_attention"
    _check_cache(name, q, k_cache, v_cache)
    N, Hq, D = q.shape
    Hkv, block_size = k_cache.shape[1], k_cache.shape[2]
    if not isinstance(block_tables, torch.Tensor) or block_tables.dim() != 2:
        got = tuple(block_tables.shape) if isinstance(block_tables, torch.Tensor) else block_tables
        raise ValueError(f"{name}: block_tables must be a 2-D tensor (sequences, max_blocks), "
                         f"got {got}")
    S, max_blocks = block_tables.shape
    block_tables = _check_index(name, "block_tables", block_tables, 2, (S, None), q.device)
    context_lens = _check_index(name, "context_lens", context_lens, 1, (S,), q.device)
    query_start = _check_index(name, "query_start", query_start, 1, (S + 1,), q.device)
    if q.device.type == "cpu":  # cheap here; on a GPU reading them would cost a host sync
        _check_ranges(name, block_tables, context_lens, query_start, N, k_cache.shape[0])
    if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1:
        raise ValueError(f"{name}: max_queries must be a positive int (the most queries of "
                         f"one sequence in this step), got {max_queries!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ValueError(f"{name}: window must be a positive int or None, got {window!r}")
    if kernel not in (None, "decode", "prefill"):
        raise ValueError(f"{name}: kernel must be 'decode', 'prefill' or None, got {kernel!r}")
    if kernel is None:
        kernel = "decode" if max_queries <= DECODE_MAX_QUERIES else "prefill"
    if kernel == "decode" and max_queries > DECODE_MAX_QUERIES:
        raise ValueError(f"{name}: the decode kernel takes 1 to {DECODE_MAX_QUERIES} queries per "
                         f"sequence, got max_queries={max_queries}; use kernel='prefill'")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"{name}: num_splits must be an int in 1..{MAX_SPLITS}, "
                         f"got {num_splits!r}")
    scale = D ** -0.5 if scale is None else float(scale)

    if not can_launch(q, k_cache, v_cache):
        return paged_attention_ref(q, k_cache, v_cache, block_tables, context_lens, query_start,
                                   window=window, scale=scale)
    out = torch.empty((N, Hq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0 or S == 0 or max_blocks == 0:
        return out.zero_()
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous()
                           for t in (q, k_cache, v_cache))
    group = Hq // Hkv
    meta = (block_tables, context_lens, query_start,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
    consts = dict(HEAD_DIM=D, BLOCK_SIZE=block_size, HAS_WINDOW=window is not None,
                  DOT_PRECISION=_dot_precision(q.dtype))
    if INTERPRETED:
        block_n, launch = INTERPRETER_BLOCK_N, {}
    else:  # a tile of keys never straddles two blocks: BLOCK_N divides block_size
        block_n = min(block_size, 64 if D * q.element_size() <= 256 else 32)
        launch = dict(num_warps=4, num_stages=2)

    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if kernel == "decode":
            T = max_queries
            heads_per_prog = max(1, min(group, MAX_ROWS // T))
            head_blocks = triton.cdiv(group, heads_per_prog)
            programs = S * Hkv * head_blocks
            splits = num_splits or default_num_splits(programs, max_blocks * block_size, q.device)
            block_m = max(16, triton.next_power_of_2(heads_per_prog * T))
            if not INTERPRETED:
                launch["num_warps"] = 4 if block_m <= 32 else 8
            o_part = torch.empty((N, Hq, splits, D), dtype=torch.float32, device=q.device)
            lse_part = torch.empty((N, Hq, splits), dtype=torch.float32, device=q.device)
            lse = torch.empty((N, Hq), dtype=torch.float32, device=q.device)  # not returned
            _paged_decode_kernel[(splits, programs)](
                q, k_cache, v_cache, o_part, lse_part, *meta, block_tables.stride(0),
                T, Hkv, group, heads_per_prog, splits, max_blocks, scale * LOG2E, window or 0,
                **consts, BLOCK_M=block_m, BLOCK_N=block_n, **launch)
            # rows (n, h) in order: exactly the combine kernel of flash decoding
            _flash_decode_combine_kernel[(N * Hq,)](
                o_part, lse_part, out, lse, splits, HEAD_DIM=D,
                BLOCK_S=max(2, triton.next_power_of_2(splits)))
        else:
            block_m = (INTERPRETER_BLOCK_M if INTERPRETED
                       else min(64, max(16, triton.next_power_of_2(max_queries))))
            grid = (triton.cdiv(max_queries, block_m), S * Hq)
            _paged_prefill_kernel[grid](
                q, k_cache, v_cache, out, *meta, out.stride(0), out.stride(1),
                block_tables.stride(0), Hq, group, max_blocks, scale * LOG2E, window or 0,
                **consts, BLOCK_M=block_m, BLOCK_N=block_n, **launch)
    return out
