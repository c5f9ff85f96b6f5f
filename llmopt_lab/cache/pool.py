"""KV storage as a pool of blocks, not tied to a batch size.

Per layer, keys and values live in ``(num_blocks, kv_heads, block_size,
head_dim)`` tensors. A :class:`~llmopt_lab.step.Step` says which slot each new
token goes to and which blocks hold each sequence's earlier tokens; the pool
has two verbs for the model:

* :meth:`KVPool.write` puts this step's keys and values in their slots, in place
  (at the rows :meth:`KVPool.write_index` computes once per forward);
* :meth:`KVPool.read` gives the attention each sequence's keys and values as a
  ``(S, kv_heads, L, head_dim)`` rectangle in position order: the storage
  itself when the step is contiguous (sequence s owns block s: a static
  cache, no copy), else the blocks gathered through the block tables (the
  plain reference of paged attention; lesson 07's kernel reads the blocks
  where they lie instead).

:class:`Int8KVPool` stores int8 codes with one float32 scale per token and
head and dequantizes on read.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import CacheError


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization with one scale per vector of the last dim.

    x: (..., D) float. Returns q (..., D) int8 in [-127, 127] and scale (..., 1)
    float32 with x ~= q * scale (scale = absmax / 127; an all-zero vector gets
    scale 1 so it dequantizes to exactly zero).

    Raises: nothing of its own (torch's errors for a tensor that is not
    floating point).
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 127.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(xf / scale), -127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q (..., D) int8 and scale (..., 1) -> (..., D) in dtype.

    Raises: nothing of its own (torch's errors for shapes that do not
    broadcast)."""
    return (q.float() * scale).to(dtype)


class KVPool:
    """Keys and values of every layer in ``num_blocks`` blocks of ``block_size``
    token slots: ``k[layer]``, ``v[layer]`` each (num_blocks, Hkv, block_size, D)
    in ``dtype``. Memory: 2 x layers x num_blocks x block_size x Hkv x D x bytes.

    Raises CacheError for sizes that are not positive integers or a block
    longer than the model's context.
    """

    #: True for storage that reallocates as it grows (a CUDA graph cannot capture it)
    reallocates = False
    #: True when k[layer], v[layer] hold the keys and values themselves, in
    #: blocks of block_size slots (what a paged kernel reads in place)
    raw_blocks = True

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, device=None,
                 dtype: torch.dtype = torch.float32):
        if not all(hasattr(n, "__index__") and not isinstance(n, bool) for n in (num_blocks, block_size)) \
                or num_blocks < 1 or block_size < 1:
            raise CacheError(f"num_blocks and block_size must be positive integers, got {num_blocks!r}, "
                             f"{block_size!r}")
        if block_size > config.max_position_embeddings:
            raise CacheError(
                f"a cache of {block_size} tokens exceeds the model's context of "
                f"{config.max_position_embeddings} tokens")
        self.config = config
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        with torch.inference_mode(False):  # plain tensors, written in place in any mode
            self._allocate()

    def _allocate(self) -> None:
        self.k = [self._zeros(self.dtype) for _ in range(self.config.num_layers)]
        self.v = [self._zeros(self.dtype) for _ in range(self.config.num_layers)]

    def _zeros(self, dtype: torch.dtype, last: int | None = None) -> torch.Tensor:
        c = self.config
        shape = (self.num_blocks, c.num_kv_heads, self.block_size, c.head_dim if last is None else last)
        return torch.zeros(shape, device=self.device, dtype=dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held by keys and values (all layers, scales included)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        return self.k + self.v

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def check_compatible(self, config: ModelConfig, dtype: torch.dtype, device) -> None:
        """Raise CacheError if this storage was built for another model shape,
        dtype or device type."""
        c = self.config
        if (c.num_layers, c.num_kv_heads, c.head_dim) != (config.num_layers, config.num_kv_heads,
                                                          config.head_dim):
            raise CacheError(
                f"cache built for {c.num_layers} layers x {c.num_kv_heads} KV heads x head_dim "
                f"{c.head_dim}, but the model has {config.num_layers} x {config.num_kv_heads} x "
                f"{config.head_dim}")
        if dtype != self.dtype:
            raise CacheError(f"cache holds {self.dtype} but the model computes in {dtype}")
        if torch.device(device).type != self.device.type:
            raise CacheError(f"cache is on {self.device} but the input is on {device}")

    def prepare(self, step) -> None:
        """Called once per forward before any layer writes: the place for
        storage that grows (see DynamicCache). A fixed pool has nothing to do."""

    def keys_len(self, step) -> int:
        """Width L of the rectangle :meth:`read` returns for ``step``."""
        return self.block_size if step.contiguous else step.block_tables.shape[1] * self.block_size

    # ------------------------------------------------------------------ verbs
    def write_index(self, step) -> torch.Tensor:
        """Row of each (token, KV head) of ``step`` in the storage seen as
        (num_blocks * Hkv * width, D): (N * Hkv,) int64, computed once per
        forward and used by every layer's :meth:`write`."""
        bs, width = self.block_size, self.k[0].shape[2]  # width: slots that exist per block
        heads = torch.arange(self.config.num_kv_heads, device=step.slots.device)
        blk, off = step.slots // bs, step.slots % bs  # (N,)
        return ((blk[:, None] * len(heads) + heads) * width + off[:, None]).reshape(-1)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> None:
        """Write k, v (N, Hkv, D) in place at the rows ``index`` of
        :meth:`write_index` (one index_copy_ per tensor)."""
        D = k.shape[-1]
        self.k[layer].view(-1, D).index_copy_(0, index, k.reshape(-1, D))
        self.v[layer].view(-1, D).index_copy_(0, index, v.reshape(-1, D))

    def read(self, layer: int, step) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of each sequence of ``step`` in position order, each
        (S, Hkv, L, D), L = :meth:`keys_len`; slots at or past a sequence's
        context length hold stale data (the attention masks them)."""
        return self._gather(self.k[layer], step), self._gather(self.v[layer], step)

    @staticmethod
    def _gather(store: torch.Tensor, step) -> torch.Tensor:
        S = step.num_seqs
        if step.contiguous:  # sequence s owns block s: the storage itself, no copy
            return store if S == store.shape[0] else store[:S]
        blocks = store[step.block_tables]  # (S, max_blocks, Hkv, bs, D)
        S, nb, H, bs, D = blocks.shape
        return blocks.permute(0, 2, 1, 3, 4).reshape(S, H, nb * bs, D)


class Int8KVPool(KVPool):
    """A pool holding int8 codes plus one float32 scale per token and head
    (``k_scale[layer]``: (num_blocks, Hkv, block_size, 1)); reads dequantize to
    ``dtype``. Half the bytes of bf16 (plus 4 bytes per token and head).

    Raises: CacheError as :class:`KVPool` (sizes that are not positive
    integers, a block longer than the context, a model of another shape,
    dtype or device)."""

    raw_blocks = False  # int8 codes: the paged kernels read floats

    def _allocate(self) -> None:
        L = self.config.num_layers
        self.k = [self._zeros(torch.int8) for _ in range(L)]
        self.v = [self._zeros(torch.int8) for _ in range(L)]
        self.k_scale = [self._zeros(torch.float32, 1) for _ in range(L)]
        self.v_scale = [self._zeros(torch.float32, 1) for _ in range(L)]

    def _tensors(self) -> list[torch.Tensor]:
        return self.k + self.v + self.k_scale + self.v_scale

    def write(self, layer, k, v, index) -> None:
        D = k.shape[-1]
        for codes, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, sc = quantize_int8_per_token(x)
            codes[layer].view(-1, D).index_copy_(0, index, q.reshape(-1, D))
            scales[layer].view(-1, 1).index_copy_(0, index, sc.reshape(-1, 1))

    def read(self, layer, step):
        g = self._gather
        return (dequantize_int8(g(self.k[layer], step), g(self.k_scale[layer], step), self.dtype),
                dequantize_int8(g(self.v[layer], step), g(self.v_scale[layer], step), self.dtype))
