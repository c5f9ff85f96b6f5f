"""Attention functions the model can run with, and the metadata they share.

The model never builds a mask or picks an attention implementation itself: it
passes q, k, v and an :class:`AttentionMeta` to an *attention function* with
the signature ``fn(q, k, v, meta, window, scale) -> out``. Lessons swap the
function (our Triton flash kernel, a paged kernel) without touching the model.

Positions are explicit. Each sequence of a batch has its own length; a query
at position p sees the valid keys at positions <= p (and > p - window with a
sliding window). When queries are fewer than keys (decode, chunked prefill,
verifying draft tokens) this rule aligns the mask bottom-right, which torch
SDPA's ``is_causal=True`` does not (it aligns top-left): we never use it with a
cache.

Cached forwards are described by a :class:`~llmopt_lab.step.Step` (packed
tokens of several sequences). :class:`StepView` derives, once per forward,
what every layer needs from it: where each token's key goes, and how the
packed queries map onto a (sequences, queries) rectangle with an
:class:`AttentionMeta`, so that every attention function below serves steps
that mix prefill chunks, decode tokens and draft verification.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .kernels import flash_attention as _flash
from .kernels import flash_decode as _flash_decode
from .kernels import paged_attention as _paged
from .errors import ConfigError
from .kernels.reference import attention_ref, causal_mask


@dataclass
class AttentionMeta:
    """What an attention function needs to know besides q, k and v.

    q_pos: (B, T) int64 positions of this step's queries.
    k_pos: (B, S) int64 positions of the keys the attention reads.
    k_valid: (B, S) bool, False for padding and for empty cache slots.
    Masks are built lazily, once per forward, and shared by all layers.
    """

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    k_valid: torch.Tensor | None = None
    #: True when queries and keys are the same tokens at positions 0..T-1 with
    #: no padding (training, a plain forward): then the plain causal mask is
    #: exact and kernels may use their built-in causal path.
    is_plain_causal: bool = False
    #: (q_start, k_len), each (B,) int: set by producers that know the layout
    #: (a static cache, a plain forward): queries sit at consecutive positions
    #: from q_start, keys at positions 0..S-1 of which the first k_len are
    #: valid. Kernels that take ranges instead of a mask (flash) then need no
    #: check and no host synchronization; None means "derive it, or use a mask".
    ranges: tuple[torch.Tensor, torch.Tensor] | None = None
    _masks: dict = field(default_factory=dict, repr=False)

    def mask(self, window: int | None = None) -> torch.Tensor:
        """(B, 1, T, S) bool visibility mask for a layer with this window."""
        if window not in self._masks:
            self._masks[window] = causal_mask(self.q_pos, self.k_pos, self.k_valid, window)
        return self._masks[window]


class AttentionFn(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
                 window: int | None, scale: float) -> torch.Tensor: ...


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
                    window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Reference attention: materialises the scores (float32 softmax).

    q: (B, Hq, T, D); k, v: (B, Hkv, S, D). Returns (B, Hq, T, D).
    """
    return attention_ref(q, k, v, meta.mask(window), scale)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
                   window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """torch's scaled_dot_product_attention with an explicit position mask.

    Grouped-query attention is handled by ``enable_gqa`` (no copy of K and V
    per query head). q: (B, Hq, T, D); k, v: (B, Hkv, S, D).
    Returns (B, Hq, T, D).
    """
    gqa = q.shape[1] != k.shape[1]
    if meta.is_plain_causal and window is None:
        # square and unpadded: top-left and bottom-right alignment coincide
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=meta.mask(window), scale=scale,
                                          enable_gqa=gqa)


def _flash_ranges(meta: AttentionMeta):
    """(q_start, k_len) per sequence for the flash kernels, or None when the
    positions lack that structure; computed once per forward (kept with the
    masks, shared by all layers)."""
    key = "flash_ranges"  # not a window: no clash with the masks' keys
    if key not in meta._masks:
        B, T = meta.q_pos.shape
        S = meta.k_pos.shape[1]
        if meta.ranges is not None:  # the producer vouches for the layout: no check
            meta._masks[key] = tuple(r.to(torch.int32) for r in meta.ranges)
        elif meta.is_plain_causal and meta.k_valid is None:  # positions 0..T-1: no check
            dev = meta.q_pos.device
            meta._masks[key] = (torch.zeros(B, dtype=torch.int32, device=dev),
                                torch.full((B,), S, dtype=torch.int32, device=dev))
        else:  # one host sync per forward
            meta._masks[key] = _flash.ranges_from_positions(meta.q_pos, meta.k_pos, meta.k_valid)
    return meta._masks[key]


def flash_attention_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
                       window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Our Triton kernels (lesson 06): flash attention for prefill (T > 16
    queries), flash decoding for 1 to 16 queries against the cache.

    The kernels take per-sequence ranges rather than a mask: consecutive query
    positions starting at q_pos[:, 0], keys at positions 0..S-1 of which the
    first k_len are valid (a plain forward, right-padded prompts, a
    StaticCache in prefill, decode, chunked prefill or draft verification).
    Anything else, and whatever the kernels cannot run on (head_dim outside
    32/64/128, other dtypes, CPU tensors on a GPU machine, no Triton), goes to
    :func:`sdpa_attention`. Sliding windows are supported.
    q: (B, Hq, T, D); k, v: (B, Hkv, S, D). Returns (B, Hq, T, D).
    """
    if not _flash.supports(q, k, v):
        return sdpa_attention(q, k, v, meta, window, scale)
    ranges = _flash_ranges(meta)
    if ranges is None:
        return sdpa_attention(q, k, v, meta, window, scale)
    q_start, k_len = ranges
    if q.shape[2] > _flash_decode.MAX_QUERIES:
        out, _ = _flash.flash_attention(q, k, v, causal=True, scale=scale, q_start=q_start,
                                        k_len=k_len, window=window)
        return out
    return _flash_decode.flash_decode(q, k, v, k_len, scale=scale, q_start=q_start, window=window)


def paged_attention_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
                       window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Lesson 07: steps over KV storage in blocks are read through the block
    tables by our Triton kernels (:mod:`llmopt_lab.kernels.paged_attention`,
    attached as ``paged_attention_fn.reads_blocks``), with no gathered copy.
    Rectangles (a forward without storage) and what the kernels cannot take
    (int8 or growing storage, a block that is not a power of two in 16..128,
    other head dims, no Triton) go to :func:`flash_attention_fn` after the
    blocks are gathered. q: (B, Hq, T, D); k, v: (B, Hkv, S, D)."""
    return flash_attention_fn(q, k, v, meta, window, scale)


def _read_blocks(q: torch.Tensor, kv, layer: int, step, window: int | None,
                 scale: float) -> torch.Tensor | None:
    """q (N, Hq, D) packed against ``kv``'s blocks of ``layer``; None when the
    kernels cannot run on this storage (the caller then gathers)."""
    if not kv.raw_blocks or not _paged.supports(q, kv.k[layer]):
        return None
    return _paged.paged_attention(q, kv.k[layer], kv.v[layer], step.block_tables, step.context_lens,
                                  step.query_start, step.max_queries, window=window, scale=scale)


paged_attention_fn.reads_blocks = _read_blocks

ATTENTION_FUNCTIONS: dict[str, Callable] = {
    "sdpa": sdpa_attention,
    "naive": naive_attention,
    "flash": flash_attention_fn,
    "paged": paged_attention_fn,
}


class StepView:
    """What the layers of one forward need from a step, computed once.

    ``where``: the storage rows this step's keys and values go to
    (:meth:`~llmopt_lab.cache.KVPool.write_index`);
    ``meta``: the :class:`AttentionMeta` of the queries laid out as
    (S, max_queries) against each sequence's L keys in position order;
    :meth:`unpack` / :meth:`pack` move queries and outputs between the packed
    (N, H, D) layout and the (S, H, max_queries, D) rectangle (a view when
    every sequence has the same number of queries; padded rows otherwise,
    computed and dropped). For a mixed step :func:`attend` does not pad: it
    runs one rectangle per group of sequences with the same query count.
    """

    def __init__(self, step, kv):
        self.step = step
        S, T = step.num_seqs, step.max_queries
        dev = step.positions.device
        keys_len = kv.keys_len(step)
        self.where = kv.write_index(step)
        if step.uniform:
            self._index = None
            q_pos = step.positions.view(S, T)
        else:  # (sequence, query number) of each packed token, from the host counts
            # built from Python ints, not with repeat_interleave on tensors: an
            # output size that depends on tensor values breaks torch.compile's graph
            seq = [s for s, n in enumerate(step.num_queries) for _ in range(n)]
            off = [i for n in step.num_queries for i in range(n)]
            self._index = (torch.tensor(seq, device=dev), torch.tensor(off, device=dev))
            q_pos = step.positions.new_zeros(S, T).index_put_(self._index, step.positions)
        k_pos = torch.arange(keys_len, device=dev).expand(S, keys_len)
        k_valid = k_pos < step.context_lens[:, None]  # (S, L)
        # queries of a sequence are consecutive positions from its first one;
        # keys sit at positions 0..L-1: the layout the flash kernels take
        self.meta = AttentionMeta(q_pos=q_pos, k_pos=k_pos, k_valid=k_valid,
                                  ranges=(q_pos[:, 0], step.context_lens))
        self._groups = None
        if not step.uniform:
            # a mixed step (decode rows beside a long prefill chunk): one
            # rectangle would pad every decode row to the chunk's length, so
            # sequences with the same number of queries attend together
            self._groups = []
            starts = [0]
            for n in step.num_queries:
                starts.append(starts[-1] + n)
            by_count: dict[int, list[int]] = {}
            for s, n in enumerate(step.num_queries):
                by_count.setdefault(n, []).append(s)
            for n, seqs in sorted(by_count.items()):
                rows = torch.tensor(seqs, device=dev)
                toks = torch.tensor([starts[s] + i for s in seqs for i in range(n)], device=dev)
                qp = step.positions[toks].view(len(seqs), n)
                meta = AttentionMeta(q_pos=qp, k_pos=k_pos[: len(seqs)], k_valid=k_valid[rows],
                                     ranges=(qp[:, 0], step.context_lens[rows]))
                self._groups.append((rows, toks, n, meta))

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, D) packed -> (S, H, max_queries, D)."""
        S, T = self.step.num_seqs, self.step.max_queries
        if self._index is None:
            return x.view(S, -1, *x.shape[1:]).transpose(1, 2)  # T inferred: no symbolic T in the shape (torch.compile)
        out = x.new_zeros(S, T, *x.shape[1:])
        out[self._index] = x
        return out.transpose(1, 2)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(S, H, max_queries, D) -> (N, H * D) packed, heads side by side."""
        x = x.transpose(1, 2)  # (S, T, H, D)
        if self._index is None:
            return x.reshape(self.step.num_tokens, -1)
        return x[self._index].flatten(1)


def attend(attn_fn: Callable, q: torch.Tensor, kv, layer: int, view: StepView,
           window: int | None, scale: float) -> torch.Tensor:
    """Attention of a step's packed queries q (N, Hq, D) over each sequence's
    keys in the KV storage ``kv`` (already holding this step's keys), with any
    attention function of the signature above. Returns (N, Hq * D)."""
    reader = getattr(attn_fn, "reads_blocks", None)
    if reader is not None:  # a kernel that reads the blocks where they lie (lesson 07)
        out = reader(q, kv, layer, view.step, window, scale)
        if out is not None:
            return out.flatten(1)
    k, v = kv.read(layer, view.step)  # (S, Hkv, L, D) each
    if view._groups is None:
        out = attn_fn(view.unpack(q), k, v, view.meta, window, scale)  # (S, Hq, T, D)
        return view.pack(out)
    out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])  # (N, Hq * D)
    for rows, toks, n, meta in view._groups:  # sequences with n queries each
        qg = q[toks].view(len(rows), n, *q.shape[1:]).transpose(1, 2)  # (G, Hq, n, D)
        og = attn_fn(qg, k[rows], v[rows], meta, window, scale)  # (G, Hq, n, D)
        out[toks] = og.transpose(1, 2).reshape(len(toks), -1)
    return out


def get_attention(name_or_fn: str | Callable) -> Callable:
    """An attention function by name ('sdpa', 'naive', 'flash', 'paged') or the
    function itself. Raises ConfigError (a ValueError) for an unknown name."""
    if callable(name_or_fn):
        return name_or_fn
    try:
        return ATTENTION_FUNCTIONS[name_or_fn]
    except KeyError:
        raise ConfigError(f"unknown attention {name_or_fn!r}; known: "
                         f"{', '.join(ATTENTION_FUNCTIONS)}") from None
