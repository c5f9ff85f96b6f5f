"""KV storage: a pool of blocks any step can write and read
(:mod:`~llmopt_lab.cache.pool`), lesson 02's static, dynamic and int8 caches
built on it (:mod:`~llmopt_lab.cache.caches`), and lesson 07's block manager
with reference counts, copy-on-write and a prefix cache
(:mod:`~llmopt_lab.cache.block_manager`)."""

from .block_manager import (BlockManager, BlockSequence, OutOfBlocks, copy_blocks, kv_waste,
                            prefix_hashes)
from .caches import (CACHES, BatchCache, DynamicCache, Int8Cache, StaticCache, kv_cache_bytes,
                     make_cache)
from .pool import Int8KVPool, KVPool, dequantize_int8, quantize_int8_per_token

__all__ = ["BlockManager", "BlockSequence", "OutOfBlocks", "copy_blocks", "kv_waste", "prefix_hashes",
           "CACHES",
           "BatchCache", "DynamicCache", "Int8Cache", "StaticCache", "kv_cache_bytes", "make_cache",
           "Int8KVPool", "KVPool", "dequantize_int8", "quantize_int8_per_token"]
