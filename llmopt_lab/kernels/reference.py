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

