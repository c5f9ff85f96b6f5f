"""The memory of attention: what naive attention holds, what flash attention
keeps on-chip, and how many bytes each moves to and from HBM (lesson 06).

Three views of the same computation ``O = softmax(Q K^T / sqrt(d)) V`` for one
head with N queries and N keys of dimension d:

* **capacity**: naive attention materialises the N x N scores and
  probabilities, so its memory grows with N^2 (:func:`naive_peak_bytes`,
  :func:`naive_max_seq_len`); flash attention holds only Q, K, V, O and one
  log-sum-exp per row, linear in N (:func:`flash_peak_bytes`,
  :func:`flash_max_seq_len`).
* **traffic**: the HBM reads and writes of the standard algorithm and of
  FlashAttention, counted as in Dao et al., "FlashAttention" (2022),
  Algorithms 0 and 1 and Theorem 2: Theta(N d + N^2) against
  Theta(N^2 d^2 / M) for an on-chip memory (SRAM) of M elements
  (:func:`naive_attention_io`, :func:`flash_attention_io`), and of our
  kernel's loop order, query tiles outside and key tiles inside, as in
  FlashAttention-2 (:func:`query_tiled_io`).
* **the on-chip step**: :func:`online_softmax_step` folds one tile of keys
  into a block of rows' running max, sum and output; :func:`attend_query_block`
  runs one query tile over all key tiles, which is what one program of the
  Triton kernel (:mod:`llmopt_lab.kernels.flash_attention`) computes.

Counts are in bytes. Q, K, V, O, scores and probabilities take ``dtype_bytes``
each; the softmax statistics (running max and sum, log-sum-exp) are float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: shared memory per streaming multiprocessor of an H100 (NVIDIA Hopper tuning
#: guide: up to 228 KB per SM, of which one thread block may use 227 KB)
H100_SMEM_BYTES = 228 * 1024
#: bytes of one softmax statistic (running max, running sum, log-sum-exp)
STAT_BYTES = 4


@dataclass(frozen=True)
class HbmTraffic:
    """Bytes read from and written to device memory (HBM) by one computation."""

    reads: int
    writes: int

    @property
    def total(self) -> int:
        return self.reads + self.writes

    def __str__(self) -> str:
        return (f"{self.total / 1e6:,.1f} MB ({self.reads / 1e6:,.1f} MB read, "
                f"{self.writes / 1e6:,.1f} MB written)")


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


# ================================================================ capacity
def score_matrix_bytes(n: int, batch: int = 1, heads: int = 1, dtype_bytes: int = 2,
                       n_keys: int | None = None) -> int:
    """Bytes of one (batch, heads, n, n_keys) score matrix (n_keys defaults to n)."""
    n_keys = n if n_keys is None else n_keys
    _check_positive(n=n, batch=batch, heads=heads, dtype_bytes=dtype_bytes, n_keys=n_keys)
    return batch * heads * n * n_keys * dtype_bytes


def naive_peak_bytes(n: int, batch: int = 1, heads: int = 1, head_dim: int = 128,
                     dtype_bytes: int = 2, matrices: int = 2, score_bytes: int | None = None,
                     include_inputs: bool = True) -> int:
    """Peak bytes of naive attention over n tokens (queries = keys = n).

    ``matrices`` score-sized matrices are alive at once (2: the scores and the
    probabilities, while the softmax writes the second from the first), each
    of ``score_bytes`` per element (default ``dtype_bytes``); plus the output
    O and, with ``include_inputs``, Q, K and V (B x H x n x head_dim each).
    Raises ValueError on non-positive sizes.
    """
    _check_positive(head_dim=head_dim, matrices=matrices)
    scores = matrices * score_matrix_bytes(n, batch, heads, score_bytes or dtype_bytes)
    tensors = (4 if include_inputs else 1) * batch * heads * n * head_dim * dtype_bytes
    return scores + tensors


def flash_peak_bytes(n: int, batch: int = 1, heads: int = 1, head_dim: int = 128,
                     dtype_bytes: int = 2, include_inputs: bool = True) -> int:
    """Peak bytes of flash attention over n tokens: the output O and one
    float32 log-sum-exp per row, plus Q, K and V with ``include_inputs``.
    Everything else lives in on-chip tiles. Raises ValueError on bad sizes."""
    _check_positive(n=n, batch=batch, heads=heads, head_dim=head_dim, dtype_bytes=dtype_bytes)
    tensors = (4 if include_inputs else 1) * batch * heads * n * head_dim * dtype_bytes
    return tensors + batch * heads * n * STAT_BYTES


def _largest_n(fits, memory_bytes: float) -> int:
    """Largest n >= 0 with fits(n) true (fits is monotone), by doubling and bisection."""
    if memory_bytes <= 0 or not fits(1):
        return 0
    hi = 1
    while fits(hi * 2):
        hi *= 2
    lo, hi = hi, hi * 2  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def naive_max_seq_len(memory_bytes: float, batch: int = 1, heads: int = 32, head_dim: int = 128,
                      dtype_bytes: int = 2, matrices: int = 2) -> int:
    """The longest sequence whose naive attention (one layer, :func:`naive_peak_bytes`
    with inputs) fits in ``memory_bytes``; 0 when not even one token fits."""
    return _largest_n(lambda n: naive_peak_bytes(n, batch, heads, head_dim, dtype_bytes,
                                                 matrices) <= memory_bytes, memory_bytes)


def flash_max_seq_len(memory_bytes: float, batch: int = 1, heads: int = 32, head_dim: int = 128,
                      dtype_bytes: int = 2) -> int:
    """The longest sequence whose flash attention (one layer, :func:`flash_peak_bytes`
    with inputs) fits in ``memory_bytes``; 0 when not even one token fits."""
    return _largest_n(lambda n: flash_peak_bytes(n, batch, heads, head_dim,
                                                 dtype_bytes) <= memory_bytes, memory_bytes)


# ================================================================= traffic
def naive_attention_io(n: int, d: int, dtype_bytes: int = 2, batch: int = 1,
                       heads: int = 1) -> HbmTraffic:
    """HBM traffic of standard attention (FlashAttention paper, Algorithm 0).

    1. read Q, K; write S = Q K^T         (2 n d read,  n^2 written)
    2. read S; write P = softmax(S)        (n^2 read,    n^2 written)
    3. read P, V; write O = P V            (n^2 + n d read, n d written)

    Per head: 3 n d + 2 n^2 elements read, n d + 2 n^2 written (Theta(n d + n^2)).
    """
    _check_positive(n=n, d=d, dtype_bytes=dtype_bytes, batch=batch, heads=heads)
    reads = 3 * n * d + 2 * n * n
    writes = n * d + 2 * n * n
    return HbmTraffic(reads * dtype_bytes * batch * heads, writes * dtype_bytes * batch * heads)


def flash_block_sizes(d: int, sram_bytes: int, dtype_bytes: int = 2) -> tuple[int, int]:
    """(B_r, B_c), the row and column block sizes of FlashAttention's Algorithm 1
    for an on-chip memory of M = sram_bytes / dtype_bytes elements:
    B_c = ceil(M / 4d), B_r = min(ceil(M / 4d), d)."""
    _check_positive(d=d, sram_bytes=sram_bytes, dtype_bytes=dtype_bytes)
    m = sram_bytes // dtype_bytes
    b_c = -(-m // (4 * d))
    return min(b_c, d), b_c


def flash_attention_io(n: int, d: int, sram_bytes: int = H100_SMEM_BYTES, dtype_bytes: int = 2,
                       batch: int = 1, heads: int = 1) -> HbmTraffic:
    """HBM traffic of FlashAttention's Algorithm 1 (key/value blocks outside,
    query blocks inside), per the paper's steps:

    * initialise O = 0, l = 0, m = -inf in HBM      (n d + 2 n written)
    * for each of T_c = ceil(n / B_c) key/value blocks: read K_j, V_j
      (2 n d over all j), and for every query block read Q_i, O_i, l_i, m_i
      and write O_i, l_i, m_i (per j: 2 n d + 2 n read, n d + 2 n written).

    Reads 2 n d + T_c (2 n d + 2 n), writes n d + 2 n + T_c (n d + 2 n): with
    T_c ~ 4 n d / M this is Theta(n^2 d^2 / M) (Theorem 2). Statistics are
    float32 (:data:`STAT_BYTES`), the rest ``dtype_bytes``.
    """
    _check_positive(n=n, d=d, sram_bytes=sram_bytes, dtype_bytes=dtype_bytes, batch=batch,
                    heads=heads)
    _, b_c = flash_block_sizes(d, sram_bytes, dtype_bytes)
    t_c = -(-n // b_c)
    reads = (2 * n * d + t_c * 2 * n * d) * dtype_bytes + t_c * 2 * n * STAT_BYTES
    writes = (n * d + t_c * n * d) * dtype_bytes + (1 + t_c) * 2 * n * STAT_BYTES
    return HbmTraffic(reads * batch * heads, writes * batch * heads)


def query_tiled_io(n: int, d: int, block_m: int = 128, dtype_bytes: int = 2, batch: int = 1,
                   heads: int = 1, causal: bool = False) -> HbmTraffic:
    """HBM traffic of our kernel's order (FlashAttention-2): each of
    ceil(n / block_m) query tiles reads its Q tile once, streams the K and V
    rows it can see (all n, or with ``causal`` the keys up to its last row),
    and writes its O tile and one log-sum-exp per row once. No caches
    assumed: K and V re-read by every query tile count every time (on a GPU
    the L2 cache serves part of them).
    """
    _check_positive(n=n, d=d, block_m=block_m, dtype_bytes=dtype_bytes, batch=batch, heads=heads)
    tiles = -(-n // block_m)
    if causal:
        keys_read = sum(min(n, (i + 1) * block_m) for i in range(tiles))
    else:
        keys_read = tiles * n
    reads = (n * d + 2 * keys_read * d) * dtype_bytes
    writes = n * d * dtype_bytes + n * STAT_BYTES
    return HbmTraffic(reads * batch * heads, writes * batch * heads)


# ========================================================= the on-chip step
def online_softmax_step(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, s: torch.Tensor,
                        v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one tile of keys into the running softmax of a block of rows.

    m: (..., R) running maximum of the scores seen so far (-inf before any);
    l: (..., R) running sum of exp(score - m); acc: (..., R, D) running sum of
    exp(score - m) * value; s: (..., R, n) this tile's scores (-inf where a key
    is masked); v: (..., n, D) this tile's values. Returns the new (m, l, acc)::

        m_new = max(m, rowmax(s));  alpha = exp(m - m_new)
        p = exp(s - m_new);  l_new = alpha * l + rowsum(p);  acc_new = alpha * acc + p @ v

    A row that has still seen no visible key keeps m = -inf, l = 0, acc = 0
    (it subtracts 0 instead of -inf, so no nan). After the last tile,
    ``acc / l`` is the attention output and ``m + log(l)`` the log-sum-exp.
    """
    m_new = torch.maximum(m, s.amax(-1))
    m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
    alpha = torch.exp(m - m_safe)
    p = torch.exp(s - m_safe[..., None])
    l_new = alpha * l + p.sum(-1)
    acc_new = alpha[..., None] * acc + p @ v
    return m_new, l_new, acc_new


def attend_query_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int = 16,
                       causal: bool = False, q_start: int = 0,
                       scale: float | None = None) -> torch.Tensor:
    """Attention of one tile of queries over all keys, one key tile at a time.

    q: (M, D), query row i at position ``q_start + i``; k, v: (S, D), key j at
    position j; with ``causal`` row i sees keys j <= q_start + i, and key tiles
    no row can see are skipped (as the kernel does). Only the (M, block_n)
    scores of the current tile exist at any time. Computes in float32.
    Returns (M, D) in q's dtype; rows that see no key are zeros.
    Raises ValueError on mismatched shapes or block_n < 1.
    """
    if q.dim() != 2 or k.dim() != 2 or k.shape != v.shape or q.shape[1] != k.shape[1]:
        raise ValueError(f"attend_query_block: q (M, D) and k, v (S, D), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    _check_positive(block_n=block_n)
    M, D = q.shape
    S = k.shape[0]
    scale = D ** -0.5 if scale is None else scale
    qf = q.float() * scale
    m = torch.full((M,), float("-inf"), device=q.device)
    l = torch.zeros(M, device=q.device)
    acc = torch.zeros(M, D, device=q.device)
    pos = q_start + torch.arange(M, device=q.device)  # (M,) query positions
    end = min(S, q_start + M) if causal else S  # keys beyond the last row's position: unseen
    for start in range(0, max(end, 0), block_n):
        stop = min(start + block_n, S)
        s = qf @ k[start:stop].float().T  # (M, n): the only score tile in memory
        if causal:
            keys = torch.arange(start, stop, device=q.device)
            s = s.masked_fill(keys[None, :] > pos[:, None], float("-inf"))
        m, l, acc = online_softmax_step(m, l, acc, s, v[start:stop].float())
    out = acc / torch.where(l > 0, l, torch.ones_like(l))[:, None]
    return out.to(q.dtype)


__all__ = ["H100_SMEM_BYTES", "STAT_BYTES", "HbmTraffic", "score_matrix_bytes", "naive_peak_bytes",
           "flash_peak_bytes", "naive_max_seq_len", "flash_max_seq_len", "naive_attention_io",
           "flash_block_sizes", "flash_attention_io", "query_tiled_io", "online_softmax_step",
           "attend_query_block"]
