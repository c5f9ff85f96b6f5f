"""Plain-torch references: the specification every kernel is tested against.

Each function is written for clarity, computes in float32 where precision
matters, and returns the input dtype. Nothing here is fast on purpose.
"""

from __future__ import annotations

import torch


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as in Llama: ``weight * x / sqrt(mean(x^2) + eps)``.

    x: (..., N) any float dtype; weight: (N,). The normalisation runs in
    float32, the result is cast back to x's dtype before the weight multiply
    (as Hugging Face's LlamaRMSNorm does). Returns (..., N) in x's dtype.
    """
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor | None = None,
                window: int | None = None) -> torch.Tensor:
    """Boolean visibility mask, causal by position.

    q_pos: (B, T) positions of the queries; k_pos: (B, S) positions of the keys;
    k_valid: (B, S) bool, False for empty cache slots or padding.
    A query at position p sees a key at position j when ``j <= p`` (and
    ``j > p - window`` with a sliding window). Because the rule is by position
    and not by index, a few queries against many keys (decode, chunked prefill,
    draft verification) are aligned bottom-right automatically.
    Returns (B, 1, T, S) bool, True = visible.
    """
    m = k_pos[:, None, :] <= q_pos[:, :, None]  # (B, T, S)
    if window is not None:
        m &= k_pos[:, None, :] > (q_pos[:, :, None] - window)
    if k_valid is not None:
        m &= k_valid[:, None, :]
    return m[:, None]


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float | None = None) -> torch.Tensor:
    """Naive attention that materialises the (T x S) score matrix.

    q: (B, Hq, T, D); k, v: (B, Hkv, S, D) with Hq a multiple of Hkv (grouped-
    query attention: query head h reads KV head h // (Hq // Hkv));
    mask: (B, 1 or Hq, T, S) bool, True = visible, or None for full attention.
    Scores and softmax in float32. A row with no visible key returns zeros.
    Returns (B, Hq, T, D) in q's dtype.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of KV heads {Hkv}")
    scale = D ** -0.5 if scale is None else scale
    k = k.repeat_interleave(Hq // Hkv, dim=1).float()  # (B, Hq, S, D)
    v = v.repeat_interleave(Hq // Hkv, dim=1).float()
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale  # (B, Hq, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows
    return torch.matmul(probs, v).to(q.dtype)


def online_softmax_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None, scale: float | None = None,
                                 block_size: int = 16, return_lse: bool = False):
    """Attention computed tile by tile over the keys: the online-softmax recurrence.

    Flash attention rests on this: softmax(s) @ V can be accumulated over key
    tiles without ever holding a whole row of scores, if each row keeps a
    running maximum ``m`` and a running sum ``l`` of exponentials. For the
    scores ``s_j`` of tile j (T x block_size)::

        m_new = max(m, rowmax(s_j))
        alpha = exp(m - m_new)                    # rescales what was summed so far
        p_j   = exp(s_j - m_new)
        l     = alpha * l + rowsum(p_j)
        acc   = alpha * acc + p_j @ V_j
        m     = m_new

    and at the end ``out = acc / l`` and ``lse = m + log(l)`` (the log of the
    softmax denominator, what a backward pass or a split-K combine needs).

    q: (B, Hq, T, D); k, v: (B, Hkv, S, D), Hq a multiple of Hkv (GQA);
    mask: (B, 1 or Hq, T, S) bool, True = visible, or None. Computes in
    float32. A row with no visible key gets zeros and lse = -inf (as
    :func:`attention_ref`). Returns out (B, Hq, T, D) in q's dtype, and with
    ``return_lse`` also lse (B, Hq, T) float32 (natural log).
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of KV heads {Hkv}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    scale = D ** -0.5 if scale is None else scale
    k = k.repeat_interleave(Hq // Hkv, dim=1).float()  # (B, Hq, S, D): clarity over memory
    v = v.repeat_interleave(Hq // Hkv, dim=1).float()
    qf = q.float() * scale
    m = torch.full((B, Hq, T), float("-inf"), device=q.device)  # running max
    l = torch.zeros((B, Hq, T), device=q.device)  # running sum of exp(s - m)
    acc = torch.zeros((B, Hq, T, D), device=q.device)  # running sum of exp(s - m) @ V
    for start in range(0, S, block_size):
        end = min(start + block_size, S)
        s = torch.matmul(qf, k[:, :, start:end].transpose(-1, -2))  # (B, Hq, T, n)
        if mask is not None:
            s = s.masked_fill(~mask[..., start:end], float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        # a row that has seen no visible key yet keeps m = -inf; subtract 0 instead
        # so that exp() gives 0 rather than exp(-inf + inf) = nan
        m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m - m_safe)
        p = torch.exp(s - m_safe[..., None])
        l = alpha * l + p.sum(-1)
        acc = alpha[..., None] * acc + torch.matmul(p, v[:, :, start:end])
        m = m_new
    seen = l > 0
    out = torch.where(seen[..., None], acc / torch.where(seen, l, 1.0)[..., None], 0.0)
    if not return_lse:
        return out.to(q.dtype)
    lse = torch.where(seen, m + torch.log(torch.where(seen, l, 1.0)), float("-inf"))
    return out.to(q.dtype), lse


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor,
                        query_start: torch.Tensor, window: int | None = None,
                        scale: float | None = None) -> torch.Tensor:
    """Attention of packed queries against a paged KV cache, one sequence at a time.

    q: (N, Hq, D), the queries of S sequences packed: sequence s owns rows
    ``query_start[s]:query_start[s + 1]`` (n_s of them), which are its LAST n_s
    positions ``context_lens[s] - n_s .. context_lens[s] - 1`` (their keys are
    already in the cache).
    k_cache, v_cache: (num_blocks, Hkv, block_size, D); position p of sequence s
    lives in block ``block_tables[s, p // block_size]`` at offset
    ``p % block_size``. block_tables: (S, max_blocks) ints; context_lens: (S,);
    query_start: (S + 1,). Query head h reads KV head h // (Hq // Hkv).
    A query at position p sees the keys at positions j <= p (and j > p - window
    with a sliding window). Scores and softmax in float32; rows that see no key
    get zeros. Returns (N, Hq, D) in q's dtype.
    """
    N, Hq, D = q.shape
    Hkv, block_size = k_cache.shape[1], k_cache.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of KV heads {Hkv}")
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros((N, Hq, D), dtype=q.dtype, device=q.device)
    starts, lens = query_start.tolist(), context_lens.tolist()
    for s, ctx in enumerate(lens):
        q0, q1 = starts[s], starts[s + 1]
        n = q1 - q0
        if n == 0:
            continue
        pos = torch.arange(ctx, device=q.device)  # (ctx,) positions of the keys
        blocks = block_tables[s].long()[pos // block_size]
        k = k_cache[blocks, :, pos % block_size]  # (ctx, Hkv, D)
        v = v_cache[blocks, :, pos % block_size]
        k = k.float().repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)  # (Hq, ctx, D)
        v = v.float().repeat_interleave(Hq // Hkv, dim=1).transpose(0, 1)
        qs = q[q0:q1].float().transpose(0, 1)  # (Hq, n, D)
        scores = torch.matmul(qs, k.transpose(-1, -2)) * scale  # (Hq, n, ctx)
        q_pos = torch.arange(ctx - n, ctx, device=q.device)  # (n,)
        visible = pos[None, :] <= q_pos[:, None]  # (n, ctx)
        if window is not None:
            visible &= pos[None, :] > q_pos[:, None] - window
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # rows seeing nothing
        out[q0:q1] = torch.matmul(probs, v).transpose(0, 1).to(q.dtype)  # (n, Hq, D)
    return out


# ------------------------------------------------------------------ quantized weights
# The kernels' formats (llmopt_lab.transforms.quantize builds them). W is the
# (N out, K in) weight of an nn.Linear, y = x @ W.T.
#   int8 weight-only: qweight_t (K, N) int8 in [-127, 127] (W transposed:
#         "K-major"), scales (N,) float32:   W[n, k] = qweight_t[k, n] * scales[n]
#   int4: packed (K // 2, N) uint8, byte [j, n] = code[n, 2j] | code[n, 2j + 1] << 4,
#         scales (K // G, N) float32, zeros (K // G, N) uint8 in [0, 15]:
#         W[n, k] = (code[n, k] - zeros[k // G, n]) * scales[k // G, n]
#   W8A8: qweight (N, K) int8 (nn.Linear's layout: int8 tensor cores want K
#         contiguous), scales (N,) float32.
# Why K-major for the weight-only formats: in a GEMV, neighbouring threads then
# read neighbouring output features of the same input k, so one value of x
# serves a whole vector of weights (see kernels/quant_matmul.py).

def pack_int4_ref(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte along the last dimension.

    codes: (..., K) integers in [0, 15], K even. Byte j holds code 2j in its
    low nibble and code 2j + 1 in its high nibble. Returns (..., K // 2) uint8.

    Raises ValueError (a plain one: this package imports no library errors)
    naming K when the last dimension is odd: pad it to an even length. Codes
    outside [0, 15] are not checked (their high bits are lost).
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last dimension must be even, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4_ref(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_ref`: (..., K // 2) uint8 -> (..., K) uint8 codes.

    Raises: nothing of its own; torch's NotImplementedError for a floating-point
    tensor (pass the uint8 bytes :func:`pack_int4_ref` made)."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)  # (..., K//2, 2) -> (..., K)


def dequantize_int8_ref(qweight_t: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """K-major int8 weights (K, N) with per-output-channel scales (N,) -> W (N, K) float32."""
    return (qweight_t.float() * scales.float()[None, :]).t()


def dequantize_int4_ref(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group_size: int) -> torch.Tensor:
    """Packed int4 (K // 2, N) with per-group scales and zero points (K // G, N)
    -> W (N, K) float32."""
    codes = unpack_int4_ref(packed.t()).float()  # (N, K)
    N, K = codes.shape
    codes = codes.view(N, K // group_size, group_size)
    w = (codes - zeros.t().float()[..., None]) * scales.t().float()[..., None]  # (N, K/G, G)
    return w.reshape(N, K)


def _linear_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = torch.matmul(x.float(), w.t())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int8_matmul_ref(x: torch.Tensor, qweight_t: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with W in the int8 format: x (..., K) -> (..., N) in x's dtype.
    Dequantizes to float32 and multiplies in float32."""
    return _linear_ref(x, dequantize_int8_ref(qweight_t, scales), bias)


def int4_matmul_ref(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor, group_size: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with W in the packed int4 format: x (..., K) -> (..., N)
    in x's dtype. Dequantizes to float32 and multiplies in float32."""
    return _linear_ref(x, dequantize_int4_ref(packed, scales, zeros, group_size), bias)


def quantize_per_token_int8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 quantization, one scale per row (token).

    x: (..., K) float. Returns q (..., K) int8 in [-127, 127] and scale (...,)
    float32 = absmax / 127 (1 for an all-zero row), so that x ~= q * scale.
    Rounds half to even (torch.round).
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / 127.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(xf / scale[..., None]), -127, 127).to(torch.int8)
    return q, scale


def w8a8_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                    bias: torch.Tensor | None = None,
                    input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8: int8 weights (N, K) with per-channel scales (N,), activations
    quantized to int8 per token on the fly.

    x (..., K) float is first multiplied by ``input_scale`` (K,) when given (a
    smoothing factor not folded into the previous op), then quantized per row
    (:func:`quantize_per_token_int8_ref`); the integer products are summed
    (in float32 here, exact while K * 127^2 < 2^24, i.e. K < 1040; int32 in
    the kernel) and rescaled: ``y[m, n] = s_x[m] * s_w[n] * sum_k xq[m, k] wq[n, k]``.
    Returns (..., N) in x's dtype.
    """
    xf = x.float()
    if input_scale is not None:
        xf = xf * input_scale.float()
    xq, sx = quantize_per_token_int8_ref(xf)
    acc = torch.matmul(xq.float(), qweight.float().t())  # (..., N)
    y = acc * sx[..., None] * w_scales.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ------------------------------------------------------------------ 2:4 sparse weights
# The format of kernels/sparse24.py (compress_24 builds it). W (N out, K in),
# K a multiple of 8, has at most 2 nonzeros in every group of 4 consecutive
# inputs (columns 4g .. 4g + 3):
#   values (N, K // 2), W's dtype: the 2 kept entries of group g are
#         values[:, 2g] and values[:, 2g + 1], in increasing column order;
#   meta (N, K // 8) uint8: the in-group index (0..3) of every kept value,
#         4 per byte, first value in the low bits: bits 2i .. 2i + 1 of byte j
#         hold the index of values[:, 4j + i] (so one byte covers groups 2j and
#         2j + 1, i.e. columns 8j .. 8j + 7):
#             W[n, 4 * ((4j + i) // 2) + ((meta[n, j] >> 2i) & 3)] = values[n, 4j + i]

def unpack_meta_24_ref(meta: torch.Tensor) -> torch.Tensor:
    """The 2-bit in-group indices of a 2:4 metadata tensor.

    meta: (N, K // 8) uint8 (layout above). Returns (N, K // 2) int64 in [0, 3]:
    entry [n, j] is the index of values[n, j] inside its group of 4.
    """
    m = meta.to(torch.int64)
    idx = torch.stack([(m >> (2 * i)) & 3 for i in range(4)], dim=-1)  # (N, K // 8, 4)
    return idx.flatten(-2)


def decompress_24_ref(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`llmopt_lab.kernels.sparse24.compress_24`: the dense 2:4 weight.

    values: (N, K // 2) float; meta: (N, K // 8) uint8 (layout above). Returns
    W (N, K) in values' dtype, zero outside the kept positions. Kept values
    land on their column by addition (``W[n, col] += value``), which is the
    kernels' semantics too; compress_24 never gives two values of a group the
    same index. Raises ValueError on inconsistent shapes or a meta that is not uint8.
    """
    if values.dim() != 2 or meta.dim() != 2 or meta.dtype != torch.uint8:
        raise ValueError(f"2:4 weights need values (N, K // 2) and uint8 meta (N, K // 8), got "
                         f"{tuple(values.shape)} and {meta.dtype} {tuple(meta.shape)}")
    N, half = values.shape
    if half % 4 or meta.shape != (N, half // 4):
        raise ValueError(f"2:4 meta must have shape (N, K // 8) = ({N}, {half // 4}) for values "
                         f"of shape {tuple(values.shape)} (K // 2 a multiple of 4), got "
                         f"{tuple(meta.shape)}")
    idx = unpack_meta_24_ref(meta).to(values.device)  # (N, K // 2)
    group = torch.arange(half, device=values.device) // 2  # group of each kept value
    cols = 4 * group[None, :] + idx
    dense = torch.zeros((N, 2 * half), dtype=values.dtype, device=values.device)
    return dense.scatter_add_(1, cols, values)


def sparse24_matmul_ref(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with W in the 2:4 compressed format: x (..., K) ->
    (..., N) in x's dtype. Decompresses (:func:`decompress_24_ref`) and
    multiplies in float32."""
    return _linear_ref(x, decompress_24_ref(values, meta).float(), bias)


# ------------------------------------------------------------------ fused elementwise ops
# References of kernels/fused.py (lesson 09, operator fusion).

def add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add followed by RMSNorm, as a pre-norm decoder layer does it.

    x, residual: (..., N), same dtype; weight: (N,). ``summed = x + residual``
    is computed as eager torch does (rounded to x's dtype), then
    ``normed = rmsnorm_ref(summed, weight, eps)`` (float32 inside).
    Returns (normed, summed), both (..., N) in x's dtype.
    """
    summed = x + residual
    return rmsnorm_ref(summed, weight, eps), summed


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of queries and keys, Llama/HF halves convention.

    q: (N, Hq, D); k: (N, Hk, D), D even; cos, sin: (N, D) or (N, 1, D).
    With x1, x2 the two halves of the last dimension, each head becomes
    ``x * cos + cat(-x2, x1) * sin`` (as :func:`llmopt_lab.model.apply_rope`),
    computed in float32 and rounded once to the input dtype (apply_rope in
    float16 rounds each product too: they can differ by an ulp or so).
    Returns new tensors (q_rot, k_rot) with the shapes and dtypes of q and k.
    """
    if cos.dim() == 2:
        cos, sin = cos[:, None, :], sin[:, None, :]  # (N, 1, D): broadcast over heads
    cos, sin = cos.float(), sin.float()

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)

    return rotate(q), rotate(k)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The SwiGLU activation of Llama's MLP: ``silu(gate) * up``.

    gate, up: (..., I), same dtype. Computed exactly as the eager model does
    (``F.silu(gate) * up``: silu in float32 inside torch, rounded to the input
    dtype, then the product, rounded again). Returns (..., I) in gate's dtype.
    """
    return torch.nn.functional.silu(gate) * up
