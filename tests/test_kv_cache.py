"""The caches of lesson 02: exact caches give the reference tokens, the int8
cache is judged by its quality, and the memory calculator adds up."""

import pytest
import torch
from conftest import scaled_model

from llmopt_lab import generate, preset
from llmopt_lab.config import ModelConfig
from llmopt_lab.errors import CacheError
from llmopt_lab.cache import (DynamicCache, Int8Cache, StaticCache, dequantize_int8,
                                 kv_cache_bytes, make_cache, quantize_int8_per_token)
from llmopt_lab.measure.metrics import kl_divergence, top1_agreement

PROMPTS = [[1, 2, 3], [10, 20, 30, 40, 50, 60, 70], [99], [5, 6, 7, 8, 9]]


@pytest.fixture(scope="module")
def model():
    return scaled_model(preset("tiny"), seed=11)


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_exact_caches_give_the_no_cache_tokens(model, kind):
    ref = generate(model, PROMPTS, 20, use_cache=False, ignore_eos=True)
    got = generate(model, PROMPTS, 20, cache=kind, ignore_eos=True)
    assert got.tolist() == ref.tolist()


def test_int8_prefill_then_decode_equals_one_token_at_a_time(model):
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    a = Int8Cache(model.config, 2, 16)
    with torch.inference_mode():
        full = model(ids, cache=a)  # prefill all 12 at once
        b = Int8Cache(model.config, 2, 16)
        steps = torch.cat([model(ids[:, t:t + 1], cache=b) for t in range(12)], dim=1)
    # k and v computed in a different batch shape may round differently in the
    # last bit, which can flip an int8 code by one step (absmax / 127): on some
    # CPUs that moves a logit by ~1e-3. A wrong slot or scale moves them by ~1.
    torch.testing.assert_close(steps, full, atol=5e-3, rtol=0)
    assert (steps - full).abs().median() < 1e-4
    for layer in range(model.config.num_layers):  # same codes, up to last-bit rounding of k and v
        assert (a.k[layer].int() - b.k[layer].int()).abs().max() <= 1
        torch.testing.assert_close(a.v_scale[layer], b.v_scale[layer], rtol=1e-4, atol=0)


def test_int8_quality_against_the_exact_cache(model):
    ids = torch.randint(0, 512, (2, 48))
    with torch.inference_mode():
        exact = model(ids, cache=StaticCache(model.config, 2, 48))
        q = model(ids, cache=Int8Cache(model.config, 2, 48))
    assert kl_divergence(exact, q) < 1e-3
    assert top1_agreement(exact, q) > 0.95
    assert not torch.equal(exact, q)  # it is lossy


def test_int8_roundtrip_error_bound():
    x = torch.randn(3, 4, 5, 64)
    q, s = quantize_int8_per_token(x)
    err = (dequantize_int8(q, s, torch.float32) - x).abs()
    assert q.dtype == torch.int8 and s.shape == (3, 4, 5, 1)
    assert (err <= s / 2 + 1e-7).all()  # round to nearest: at most half a step
    zq, zs = quantize_int8_per_token(torch.zeros(2, 8))
    assert dequantize_int8(zq, zs, torch.float32).eq(0).all()


def test_bytes_of_each_cache():
    c = preset("tiny")
    fp32 = StaticCache(c, 2, 100)
    assert fp32.nbytes == kv_cache_bytes(c, 2, 100, torch.float32)
    assert StaticCache(c, 2, 100, dtype=torch.bfloat16).nbytes == kv_cache_bytes(c, 2, 100, "bf16")
    i8 = Int8Cache(c, 2, 100)
    per_token_head = c.head_dim + 4  # int8 values + one float32 scale
    assert i8.nbytes == 2 * c.num_layers * 2 * c.num_kv_heads * 100 * per_token_head


def test_calculator_reproduces_terabytes_for_a_175b_model_at_batch_512():
    big = ModelConfig(vocab_size=50257, hidden_size=12288, intermediate_size=32768, num_layers=96,
                      num_heads=96, num_kv_heads=96, max_position_embeddings=2048)
    kv = kv_cache_bytes(big, 512, 2048, "float16")
    weights = big.num_parameters() * 2
    assert 4e12 < kv < 6e12  # ~4.9 TB
    assert kv / weights > 10  # many times the ~350 GB of fp16 weights
    mqa = big.replace(num_kv_heads=1)
    assert kv_cache_bytes(mqa, 512, 2048, "float16") == kv / 96


@pytest.mark.parametrize("kind", ["static", "dynamic", "int8"])
def test_rollback_then_regenerate(model, kind):
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    cache = make_cache(kind, model.config, 1, 32)
    with torch.inference_mode():
        model(ids, cache=cache)
        first = model(torch.tensor([[9, 2]]), cache=cache)
        cache.truncate(torch.tensor([5]))
        assert cache.lengths.tolist() == [5]
        again = model(torch.tensor([[9, 2]]), cache=cache)
    torch.testing.assert_close(again, first)


def test_dynamic_cache_grows_and_has_a_limit(model):
    cache = DynamicCache(model.config, 1, max_len=8)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3, 4, 5, 6]]), cache=cache)
        assert cache.slots == 6 and cache.k[0].shape[2] == 6
        with pytest.raises(CacheError, match="limit of 8"):
            model(torch.tensor([[1, 2, 3]]), cache=cache)


def test_unknown_cache_kind(model):
    with pytest.raises(CacheError, match="unknown cache"):
        generate(model, [[1]], 2, cache="paged")


def test_cache_quality_of_an_exact_cache_is_perfect(model):
    from llmopt_lab.benchmarks.kv_cache import cache_quality

    ids = torch.randint(0, 512, (3, 20))
    lengths = torch.tensor([20, 11, 2])
    same = cache_quality(model, ids, lengths, kind="static")
    assert same["tokens"] == 19 + 10 + 1 and same["ppl"] == same["ppl_exact"]
    assert same["kl"] < 1e-9 and same["top1"] == 1.0
    lossy = cache_quality(model, ids, lengths, kind="int8")
    assert 0 < lossy["kl"] < 1e-2 and abs(lossy["ppl_delta_pct"]) < 5


def test_benchmark_clamps_positions_to_the_context(monkeypatch):
    # a position at the very end of the context leaves no room for the timed
    # steps: it is measured at the last position that fits, and says so
    from llmopt_lab.benchmarks import kv_cache as kvb

    monkeypatch.setitem(kvb.SIZES, "edge", dict(kvb.SIZES["quick"], positions=[16, 1024], steps=2,
                                                 flat_tokens=4096, quality_windows=1))
    out = kvb.run("edge", "cpu", progress=False)
    assert out["positions_asked"] == [16, 1024]
    last = 1024 - kvb.WARMUP - 2 - 1
    assert sorted({r["position"] for r in out["rows"]}) == [16, last]
    assert out["flat_tokens"] == 1022
    assert 0.4 < out["int8"]["bytes_ratio_vs_bf16"] < 0.6
    assert "at position %d" % last in kvb.summary_text(out)
