"""KV caches: where the keys and values of earlier tokens live between steps.

A cache object is passed to the model's forward. The model calls, per step,
``meta = cache.begin(positions, token_valid)`` once and then, per layer,
``k_all, v_all = cache.update(layer_idx, k, v, positions)``; the attention
function reads ``k_all, v_all`` under ``meta``'s mask. Any class with these
methods (and ``check_compatible``) is a cache.

* :class:`StaticCache` preallocates ``batch x kv_heads x max_len x head_dim``
  per layer and writes each token in place at slot = its position, so decode
  steps have fixed shapes (what CUDA graphs and ``torch.compile`` want).
* :class:`DynamicCache` grows by concatenation, the naive way: every step
  allocates a new, longer tensor per layer and copies the old one into it.
* :class:`Int8Cache` stores keys and values as int8 with one scale per token
  and head (absmax over head_dim) and dequantizes on read: half the bytes of
  bf16, a quarter of fp32, at a small quality cost.

Every sequence of a batch has its own length and positions (no reliance on
left padding): paged attention, speculative decoding and continuous batching
need this. :func:`kv_cache_bytes` is the memory calculator.
"""

from __future__ import annotations

import torch

from .attention import AttentionMeta
from .config import ModelConfig, bytes_per_element
from .errors import CacheError


class KVCache:
    """What every cache shares: the model shape it was built for, the batch
    size, dtype, device, and each sequence's length ``lengths`` (B,) int64."""

    def __init__(self, config: ModelConfig, batch_size: int, device=None,
                 dtype: torch.dtype = torch.float32, max_len: int | None = None):
        max_len = config.max_position_embeddings if max_len is None else max_len
        if batch_size < 1 or max_len < 1:
            raise CacheError(f"batch_size and max_len must be positive, got {batch_size}, {max_len}")
        if max_len > config.max_position_embeddings:
            raise CacheError(
                f"a cache of {max_len} tokens exceeds the model's context of "
                f"{config.max_position_embeddings} tokens")
        self.config = config
        self.batch_size, self.max_len, self.dtype = batch_size, max_len, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)

    @property
    def nbytes(self) -> int:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

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

    def _grow_lengths(self, positions: torch.Tensor, token_valid: torch.Tensor | None) -> None:
        pos = positions if token_valid is None else positions.masked_fill(~token_valid, -1)
        self.lengths = torch.maximum(self.lengths, pos.max(dim=1).values + 1)

    def truncate(self, lengths: torch.Tensor) -> None:
        """Forget everything at positions >= lengths (B,) (rollback, e.g. of
        rejected draft tokens); later writes overwrite those slots."""
        self.lengths = torch.minimum(self.lengths, lengths.to(self.lengths))

    def reset(self) -> None:
        """Empty every sequence (a new tensor, not zero_(): lengths may be an
        inference-mode tensor)."""
        self.lengths = torch.zeros_like(self.lengths)


class StaticCache(KVCache):
    """Preallocated KV cache with per-sequence lengths.

    k[layer], v[layer]: (B, Hkv, max_len, D) in ``dtype``; slot j holds the key
    of position j. ``lengths``: (B,) int64, the number of filled slots of each
    sequence. Memory: 2 x layers x B x Hkv x max_len x D x bytes per element.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(config, batch_size, device, dtype, max_len)
        self.k = [self._alloc(dtype) for _ in range(config.num_layers)]
        self.v = [self._alloc(dtype) for _ in range(config.num_layers)]
        self._slot_pos = torch.arange(max_len, device=self.device).expand(batch_size, max_len)

    def _alloc(self, dtype: torch.dtype, last: int | None = None) -> torch.Tensor:
        c = self.config
        shape = (self.batch_size, c.num_kv_heads, self.max_len, c.head_dim if last is None else last)
        return torch.zeros(shape, device=self.device, dtype=dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held by keys and values (all layers)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def begin(self, positions: torch.Tensor, token_valid: torch.Tensor | None) -> AttentionMeta:
        """Start a step writing tokens at ``positions`` (B, T).

        Lengths grow to cover the valid tokens of the step; the returned
        metadata lets each query see every filled slot at a position <= its own.
        Positions must continue the sequences (slot = position) and be < max_len.
        """
        self._grow_lengths(positions, token_valid)
        k_valid = self._slot_pos < self.lengths[:, None]  # (B, max_len)
        return AttentionMeta(q_pos=positions, k_pos=self._slot_pos, k_valid=k_valid,
                             ranges=(positions[:, 0], self.lengths))

    @staticmethod
    def _scatter(dst: torch.Tensor, src: torch.Tensor, positions: torch.Tensor) -> None:
        B, H, T, D = src.shape
        dst.scatter_(2, positions[:, None, :, None].expand(B, H, T, D), src)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at slots ``positions`` (B, T) in place and
        return the whole layer cache, each (B, Hkv, max_len, D)."""
        self._scatter(self.k[layer_idx], k, positions)
        self._scatter(self.v[layer_idx], v, positions)
        return self.k[layer_idx], self.v[layer_idx]


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization with one scale per vector of the last dim.

    x: (..., D) float. Returns q (..., D) int8 in [-127, 127] and scale (..., 1)
    float32 with x ~= q * scale (scale = absmax / 127; an all-zero vector gets
    scale 1 so it dequantizes to exactly zero).
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 127.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(xf / scale), -127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q (..., D) int8 and scale (..., 1) -> (..., D) in dtype."""
    return (q.float() * scale).to(dtype)


class Int8Cache(StaticCache):
    """A static cache that stores K and V in int8, one float32 scale per token
    and KV head (absmax over head_dim), and dequantizes on read.

    Keys and values go through quantize -> dequantize in prefill as well as in
    decode, and each token is quantized on its own, so prefill-then-decode
    equals feeding the tokens one by one. Reads return the whole layer
    dequantized to the model dtype: simple and exact, but it costs a full
    pass over the cache per layer and step (a fused kernel would dequantize
    inside attention). Memory: (D + 4) bytes per token, head and K/V, against
    2 D for bf16.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None,
                 dtype: torch.dtype = torch.float32):
        KVCache.__init__(self, config, batch_size, device, dtype, max_len)
        n = config.num_layers
        self.k = [self._alloc(torch.int8) for _ in range(n)]
        self.v = [self._alloc(torch.int8) for _ in range(n)]
        self.k_scale = [self._alloc(torch.float32, 1) for _ in range(n)]
        self.v_scale = [self._alloc(torch.float32, 1) for _ in range(n)]
        self._slot_pos = torch.arange(max_len, device=self.device).expand(batch_size, max_len)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.k_scale + self.v_scale)

    def update(self, layer_idx, k, v, positions):
        kq, ks = quantize_int8_per_token(k)
        vq, vs = quantize_int8_per_token(v)
        self._scatter(self.k[layer_idx], kq, positions)
        self._scatter(self.v[layer_idx], vq, positions)
        self._scatter(self.k_scale[layer_idx], ks, positions)
        self._scatter(self.v_scale[layer_idx], vs, positions)
        return (dequantize_int8(self.k[layer_idx], self.k_scale[layer_idx], self.dtype),
                dequantize_int8(self.v[layer_idx], self.v_scale[layer_idx], self.dtype))


class DynamicCache(KVCache):
    """A cache that grows by concatenation (the naive way, for comparison).

    Each step appends its T tokens to every sequence, padding included, so a
    slot's position is stored beside it: ``k_pos`` (B, S) and ``k_valid``
    (B, S). Every step allocates new (B, Hkv, S + T, D) tensors and copies the
    old ones: O(S) work and allocator churn per step, where the static cache
    writes T slots in place.
    """

    def __init__(self, config: ModelConfig, batch_size: int, device=None,
                 dtype: torch.dtype = torch.float32, max_len: int | None = None):
        super().__init__(config, batch_size, device, dtype, max_len)
        c = config
        empty = (batch_size, c.num_kv_heads, 0, c.head_dim)
        self.k = [torch.zeros(empty, device=self.device, dtype=dtype) for _ in range(c.num_layers)]
        self.v = [torch.zeros(empty, device=self.device, dtype=dtype) for _ in range(c.num_layers)]
        self.k_pos = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)
        self.k_valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=self.device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def slots(self) -> int:
        """Slots held per sequence (valid or not)."""
        return self.k_pos.shape[1]

    def begin(self, positions: torch.Tensor, token_valid: torch.Tensor | None) -> AttentionMeta:
        if self.slots + positions.shape[1] > self.max_len:
            raise CacheError(f"the dynamic cache would exceed its limit of {self.max_len} slots")
        self._grow_lengths(positions, token_valid)
        valid = torch.ones_like(positions, dtype=torch.bool) if token_valid is None else token_valid
        self.k_pos = torch.cat([self.k_pos, positions], dim=1)
        self.k_valid = torch.cat([self.k_valid, valid], dim=1) & (self.k_pos < self.lengths[:, None])
        return AttentionMeta(q_pos=positions, k_pos=self.k_pos, k_valid=self.k_valid)

    def update(self, layer_idx, k, v, positions):
        self.k[layer_idx] = torch.cat([self.k[layer_idx], k], dim=2)
        self.v[layer_idx] = torch.cat([self.v[layer_idx], v], dim=2)
        return self.k[layer_idx], self.v[layer_idx]

    def truncate(self, lengths: torch.Tensor) -> None:
        super().truncate(lengths)
        self.k_valid = self.k_valid & (self.k_pos < self.lengths[:, None])

    def reset(self) -> None:
        self.__init__(self.config, self.batch_size, self.device, self.dtype, self.max_len)


CACHES = {"static": StaticCache, "dynamic": DynamicCache, "int8": Int8Cache}


def make_cache(kind: str, config: ModelConfig, batch_size: int, max_len: int, device=None,
               dtype: torch.dtype = torch.float32) -> KVCache:
    """A cache by name: 'static', 'dynamic' or 'int8'."""
    if kind not in CACHES:
        raise CacheError(f"unknown cache {kind!r}; known: {', '.join(CACHES)}")
    if kind == "dynamic":
        return DynamicCache(config, batch_size, device, dtype, max_len)
    return CACHES[kind](config, batch_size, max_len, device, dtype)


def kv_cache_bytes(config: ModelConfig, batch: int, tokens: int, dtype="bfloat16") -> float:
    """Bytes of a KV cache: 2 (K and V) x layers x kv_heads x head_dim x bytes
    per element x batch x tokens. dtype: a torch dtype or name ('int8' counts
    one byte and ignores the scales)."""
    return (2 * config.num_layers * config.num_kv_heads * config.head_dim
            * bytes_per_element(dtype) * batch * tokens)
