"""KV caches: where the keys and values of earlier tokens live between steps.

A cache object is passed to the model's forward. The model calls, per step,
``meta = cache.begin(positions, token_valid)`` once and then, per layer,
``k_all, v_all = cache.update(layer_idx, k, v, positions)``; the attention
function reads ``k_all, v_all`` under ``meta``'s mask. Any class with these
methods (and ``check_compatible``) is a cache: lesson 02 adds dynamic and
quantised ones, lesson 07 a paged one.

:class:`StaticCache` preallocates ``batch x kv_heads x max_len x head_dim`` per
layer and writes each token in place at slot = its position, so that decode
steps have fixed shapes (what CUDA graphs and ``torch.compile`` want). Every
sequence has its own length.
"""

from __future__ import annotations

import torch

from .attention import AttentionMeta
from .config import ModelConfig
from .errors import CacheError


class StaticCache:
    """Preallocated KV cache with per-sequence lengths.

    k[layer], v[layer]: (B, Hkv, max_len, D) in ``dtype``; slot j holds the key
    of position j. ``lengths``: (B,) int64, the number of filled slots of each
    sequence. Memory: 2 x layers x B x Hkv x max_len x D x bytes per element.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None,
                 dtype: torch.dtype = torch.float32):
        if batch_size < 1 or max_len < 1:
            raise CacheError(f"batch_size and max_len must be positive, got {batch_size}, {max_len}")
        if max_len > config.max_position_embeddings:
            raise CacheError(
                f"a cache of {max_len} tokens exceeds the model's context of "
                f"{config.max_position_embeddings} tokens")
        self.config = config
        self.batch_size, self.max_len, self.dtype = batch_size, max_len, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(config.num_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._slot_pos = torch.arange(max_len, device=self.device).expand(batch_size, max_len)

    @property
    def nbytes(self) -> int:
        """Bytes held by keys and values (all layers)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def check_compatible(self, config: ModelConfig, batch_size: int, dtype: torch.dtype,
                         device: torch.device) -> None:
        """Raise CacheError if this cache was built for another model, batch or dtype."""
        c = self.config
        if (c.num_layers, c.num_kv_heads, c.head_dim) != (config.num_layers, config.num_kv_heads,
                                                          config.head_dim):
            raise CacheError(
                f"cache built for {c.num_layers} layers x {c.num_kv_heads} KV heads x head_dim "
                f"{c.head_dim}, but the model has {config.num_layers} x {config.num_kv_heads} x "
                f"{config.head_dim}")
        if batch_size != self.batch_size:
            raise CacheError(f"cache built for batch {self.batch_size}, got a batch of {batch_size}")
        if dtype != self.dtype:
            raise CacheError(f"cache holds {self.dtype} but the model computes in {dtype}")
        if torch.device(device).type != self.device.type:
            raise CacheError(f"cache is on {self.device} but the input is on {device}")

    def begin(self, positions: torch.Tensor, token_valid: torch.Tensor | None) -> AttentionMeta:
        """Start a step writing tokens at ``positions`` (B, T).

        Lengths grow to cover the valid tokens of the step; the returned
        metadata lets each query see every filled slot at a position <= its own.
        Positions must continue the sequences (slot = position) and be < max_len.
        """
        pos = positions if token_valid is None else positions.masked_fill(~token_valid, -1)
        self.lengths = torch.maximum(self.lengths, pos.max(dim=1).values + 1)
        k_valid = self._slot_pos < self.lengths[:, None]  # (B, max_len)
        return AttentionMeta(q_pos=positions, k_pos=self._slot_pos, k_valid=k_valid)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at slots ``positions`` (B, T) in place and
        return the whole layer cache, each (B, Hkv, max_len, D)."""
        B, H, T, D = k.shape
        idx = positions[:, None, :, None].expand(B, H, T, D)
        self.k[layer_idx].scatter_(2, idx, k)
        self.v[layer_idx].scatter_(2, idx, v)
        return self.k[layer_idx], self.v[layer_idx]

    def truncate(self, lengths: torch.Tensor) -> None:
        """Forget everything at positions >= lengths (B,) (rollback); the slots
        are overwritten by later writes."""
        self.lengths = torch.minimum(self.lengths, lengths.to(self.lengths))

    def reset(self) -> None:
        """Empty every sequence (the memory stays allocated)."""
        # a new tensor, not zero_(): lengths may be an inference-mode tensor
        self.lengths = torch.zeros_like(self.lengths)
