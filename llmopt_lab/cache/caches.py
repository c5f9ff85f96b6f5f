"""The caches of lesson 02: a batch of sequences, each with its own length.

* :class:`StaticCache` preallocates ``batch x kv_heads x max_len x head_dim``
  per layer: a :class:`~llmopt_lab.cache.pool.KVPool` with one block of
  ``max_len`` slots per sequence. Each token is written in place at slot = its
  position, so decode steps have fixed shapes (what CUDA graphs and
  ``torch.compile`` want).
* :class:`DynamicCache` grows by concatenation, the naive way: every step that
  reaches a new position allocates a longer tensor per layer and copies the
  old one into it.
* :class:`Int8Cache` stores keys and values as int8 with one scale per token
  and head (absmax over head_dim) and dequantizes on read: half the bytes of
  bf16, a quarter of fp32, at a small quality cost.

They serve the model's rectangular call ``model(input_ids, positions,
cache=cache, lengths=...)``, which the lessons use to run steps by hand: the
cache turns the (B, T) rectangle into a :class:`~llmopt_lab.step.Step`
(:meth:`BatchCache.rect_step`) and keeps each sequence's length in
``lengths`` (B,) int64, updated in place. ``generate`` drives the same storage
with steps it builds from its own sequence objects.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig, bytes_per_element
from ..errors import CacheError
from ..step import Step
from .pool import Int8KVPool, KVPool


class BatchCache:
    """Sequence state for the rectangular call: ``batch_size`` sequences, one
    block of ``max_len`` slots each, and their lengths (B,) int64 (a device
    tensor updated in place, never rebound).

    Raises:
        CacheError: a batch_size or max_len that is not a positive integer;
            from :meth:`rect_step`, positions that are not a (B, T) integer
            tensor, are negative or lie past max_len; from :meth:`truncate`,
            lengths that are not one integer >= 0 per sequence; a batch of
            another size than the cache's.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None,
                 dtype: torch.dtype = torch.float32):
        if not all(hasattr(n, "__index__") and not isinstance(n, bool) for n in (batch_size, max_len)) \
                or batch_size < 1 or max_len < 1:
            raise CacheError(f"batch_size and max_len must be positive integers, got {batch_size!r}, "
                             f"{max_len!r}")
        # the storage: one block of max_len slots per sequence (the pool class beside this one)
        super().__init__(config, batch_size, max_len, device, dtype)
        self._init_batch(batch_size, max_len)

    def _init_batch(self, batch_size: int, max_len: int) -> None:
        self.batch_size, self.max_len = batch_size, max_len
        with torch.inference_mode(False):
            self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            self._rows = torch.arange(batch_size, device=self.device)

    def check_batch(self, config: ModelConfig, batch_size: int, dtype: torch.dtype, device) -> None:
        """Raise CacheError if this cache was built for another model, batch or dtype."""
        self.check_compatible(config, dtype, device)
        if batch_size != self.batch_size:
            raise CacheError(f"cache built for batch {self.batch_size}, got a batch of {batch_size}")

    def rect_step(self, input_ids: torch.Tensor, positions: torch.Tensor,
                  token_valid: torch.Tensor | None) -> Step:
        """The step of a (B, T) rectangle: row b's tokens at ``positions[b]``
        (consecutive), ``token_valid`` (B, T) False for right padding (written
        past the row's length, never attended to). Lengths grow to cover the
        valid tokens. Raises CacheError when ``positions`` is not a (B, T)
        integer tensor, and when a position is negative or past ``max_len``
        (values not checked while a CUDA graph is being captured: no host sync
        there)."""
        B, T = input_ids.shape
        if (not isinstance(positions, torch.Tensor) or tuple(positions.shape) != (B, T)
                or positions.is_floating_point() or positions.dtype == torch.bool):
            got = (f"{positions.dtype} {tuple(positions.shape)}" if isinstance(positions, torch.Tensor)
                   else repr(positions))
            raise CacheError(f"positions must be a ({B}, {T}) integer tensor like input_ids, got {got}")
        capturing = positions.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and positions.numel():
            lo, hi = torch.stack(torch.aminmax(positions)).tolist()  # one host sync for both
            if lo < 0:
                raise CacheError(f"positions must be >= 0, got {lo}: a negative position would "
                                 "write into another sequence's slots")
            if hi >= self.max_len:
                raise CacheError(f"this call writes up to position {hi}, past the cache's limit of "
                                 f"{self.max_len} positions per sequence: make the cache larger "
                                 f"(max_len) or the input shorter")
        pos = positions if token_valid is None else positions.masked_fill(~token_valid, -1)
        self.lengths.copy_(torch.maximum(self.lengths, pos.max(dim=1).values + 1))
        slots = self._rows[:, None] * self.block_size + positions  # (B, T)
        return Step(tokens=input_ids.reshape(-1), positions=positions.reshape(-1),
                    slots=slots.reshape(-1),
                    query_start=torch.arange(B + 1, device=self.device) * T,
                    context_lens=self.lengths, block_tables=self._rows[:, None],
                    block_size=self.block_size, num_queries=(T,) * B, contiguous=True)

    def truncate(self, lengths: torch.Tensor) -> None:
        """Forget everything at positions >= lengths (B,) (rollback, e.g. of
        rejected draft tokens); later writes overwrite those slots. Raises
        CacheError for a shape other than (B,), a non-integer dtype or a
        negative length."""
        lengths = torch.as_tensor(lengths, device=self.device)
        if (lengths.shape != self.lengths.shape or lengths.is_floating_point()
                or lengths.is_complex() or bool((lengths < 0).any())):
            raise CacheError(f"truncate takes one length >= 0 per sequence ({self.batch_size}, "
                             f"integers), got {lengths.tolist()}")
        self.lengths.copy_(torch.minimum(self.lengths, lengths.to(self.lengths)))

    def reset(self) -> None:
        """Empty every sequence."""
        self.lengths.zero_()


class StaticCache(BatchCache, KVPool):
    """Preallocated KV cache with per-sequence lengths: ``StaticCache(config,
    batch_size, max_len, device=None, dtype=torch.float32)``.

    k[layer], v[layer]: (B, Hkv, max_len, D) in ``dtype`` (block b = sequence b);
    slot j holds the key of position j. ``lengths``: (B,) int64, the number of
    filled slots of each sequence. Memory: 2 x layers x B x Hkv x max_len x D x
    bytes per element. Raises CacheError for non-positive sizes or a max_len
    beyond the model's context.
    """



class Int8Cache(BatchCache, Int8KVPool):
    """A static cache holding int8 codes and per-token, per-head float32
    scales (``k_scale[layer]``: (B, Hkv, max_len, 1)); dequantized on read.

    Raises: CacheError as :class:`StaticCache` (sizes, positions, capacity)."""


class DynamicCache(BatchCache, KVPool):
    """A cache that grows by concatenation (the naive way, for comparison).

    Slots are numbered as in a static cache of ``max_len`` per sequence, but
    only the first :attr:`slots` exist: a step reaching position p >= slots
    allocates new (B, Hkv, p + 1, D) tensors per layer and copies the old ones
    into them. O(S) work and allocator churn per step, where the static cache
    writes in place. Raises CacheError past ``max_len`` (default: the model's
    context).
    """

    reallocates = True
    raw_blocks = False  # only the first `slots` of each max_len block exist

    def __init__(self, config: ModelConfig, batch_size: int, device=None,
                 dtype: torch.dtype = torch.float32, max_len: int | None = None):
        max_len = config.max_position_embeddings if max_len is None else max_len
        super().__init__(config, batch_size, max_len, device, dtype)

    def _allocate(self) -> None:
        c = self.config
        empty = (self.num_blocks, c.num_kv_heads, 0, c.head_dim)
        self.k = [torch.zeros(empty, device=self.device, dtype=self.dtype) for _ in range(c.num_layers)]
        self.v = [torch.zeros(empty, device=self.device, dtype=self.dtype) for _ in range(c.num_layers)]

    @property
    def slots(self) -> int:
        """Slots that exist per sequence (filled or not)."""
        return self.k[0].shape[2]

    def keys_len(self, step) -> int:
        return self.slots

    def prepare(self, step) -> None:
        need = int(step.positions.max()) + 1  # one host sync: the naive cache's price
        if need > self.max_len:
            raise CacheError(f"the dynamic cache would exceed its limit of {self.max_len} slots")
        grow = need - self.slots
        if grow > 0:
            pad = (self.num_blocks, self.config.num_kv_heads, grow, self.config.head_dim)
            with torch.inference_mode(False):  # plain tensors, as at construction
                for store in (self.k, self.v):
                    for i, t in enumerate(store):
                        store[i] = torch.cat([t, t.new_zeros(pad)], dim=2)

    def reset(self) -> None:
        super().reset()
        self._allocate()


CACHES = {"static": StaticCache, "dynamic": DynamicCache, "int8": Int8Cache}


def make_cache(kind: str, config: ModelConfig, batch_size: int, max_len: int, device=None,
               dtype: torch.dtype = torch.float32):
    """A cache by name: 'static', 'dynamic' or 'int8'. Raises CacheError for
    another name."""
    if kind not in CACHES:
        raise CacheError(f"unknown cache {kind!r}; known: {', '.join(CACHES)}")
    if kind == "dynamic":
        return DynamicCache(config, batch_size, device, dtype, max_len)
    return CACHES[kind](config, batch_size, max_len, device, dtype)


def kv_cache_bytes(config: ModelConfig, batch: int, tokens: int, dtype="bfloat16") -> float:
    """Bytes of a KV cache: 2 (K and V) x layers x kv_heads x head_dim x bytes
    per element x batch x tokens. dtype: a torch dtype or name ('int8' counts
    one byte and ignores the scales).

    Raises: ConfigError for an unknown dtype name."""
    return (2 * config.num_layers * config.num_kv_heads * config.head_dim
            * bytes_per_element(dtype) * batch * tokens)
