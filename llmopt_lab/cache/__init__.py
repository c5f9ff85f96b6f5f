"""KV storage: a pool of blocks any step can write and read
(:mod:`~llmopt_lab.cache.pool`), and lesson 02's static, dynamic and int8
caches built on it (:mod:`~llmopt_lab.cache.caches`)."""

from .caches import (CACHES, BatchCache, DynamicCache, Int8Cache, StaticCache, kv_cache_bytes,
                     make_cache)
from .pool import Int8KVPool, KVPool, dequantize_int8, quantize_int8_per_token

__all__ = ["CACHES", "BatchCache", "DynamicCache", "Int8Cache", "StaticCache", "kv_cache_bytes",
           "make_cache", "Int8KVPool", "KVPool", "dequantize_int8", "quantize_int8_per_token"]
