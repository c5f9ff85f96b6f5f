"""Generation: the static-cache path gives the no-cache path's greedy tokens."""

import pytest
import torch
from conftest import scaled_model

from llmopt_lab import StaticCache, generate, preset
from llmopt_lab.errors import CacheError, GenerationError
from llmopt_lab.generate import decode_one_token, prefill

NEAR_TIE = 1e-4


@pytest.fixture(scope="module")
def model():
    return scaled_model(preset("tiny"), seed=7)


def assert_same_greedy(ref, got):
    """Tokens identical, except that a divergence is accepted at a near-tie of
    the reference (top-2 logit gap < 1e-4 at that step), after which the two
    sequences legitimately differ."""
    for b, (r, g) in enumerate(zip(ref.tolist(), got.tolist())):
        if r == g:
            continue
        step = next(i for i, (x, y) in enumerate(zip(r, g)) if x != y)
        top2 = ref.logits[b, step].topk(2).values
        gap = float(top2[0] - top2[1])
        assert gap < NEAR_TIE, f"sequence {b} diverges at step {step} with a top-2 gap of {gap:.2e}"


@pytest.mark.parametrize("prompts", [
    [[5, 9, 2, 7]],
    [[1, 2, 3], [10, 20, 30, 40, 50, 60, 70], [99]],  # different lengths in one batch
    torch.randint(0, 512, (2, 6)),
])
def test_cached_greedy_equals_uncached(model, prompts):
    ref = generate(model, prompts, 24, use_cache=False, ignore_eos=True, return_logits=True)
    got = generate(model, prompts, 24, use_cache=True, ignore_eos=True, return_logits=True)
    assert ref.tokens.shape == (len(prompts), 24)
    assert_same_greedy(ref, got)
    # the gaps here are far from near-ties: the tokens are in fact identical
    assert ref.tolist() == got.tolist()


def test_batched_equals_one_by_one(model):
    prompts = [[3, 4, 5, 6, 7, 8], [11], [100, 200, 300]]
    batch = generate(model, prompts, 12, ignore_eos=True)
    singles = [generate(model, [p], 12, ignore_eos=True).tolist()[0] for p in prompts]
    assert batch.tolist() == singles


def test_prefill_then_decode_equals_full_forward_logits(model):
    ids = torch.randint(0, 512, (2, 9))
    cache = StaticCache(model.config, 2, 16)
    logits = prefill(model, ids[:, :6], torch.tensor([6, 6]), cache)
    full = model(ids).float()
    torch.testing.assert_close(logits, full[:, 5], atol=1e-4, rtol=0)
    for t in range(6, 9):
        step = decode_one_token(model, ids[:, t], torch.tensor([t, t]), cache)
        torch.testing.assert_close(step, full[:, t], atol=1e-4, rtol=0)
    assert cache.lengths.tolist() == [9, 9]


def test_sampling_is_seeded_and_reproducible(model):
    a = generate(model, [[1, 2, 3]], 16, temperature=1.0, top_k=50, seed=123, ignore_eos=True)
    b = generate(model, [[1, 2, 3]], 16, temperature=1.0, top_k=50, seed=123, ignore_eos=True)
    c = generate(model, [[1, 2, 3]], 16, temperature=1.0, top_k=50, seed=124, ignore_eos=True)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    # sampling with the cache and without gives the same draws for the same seed
    d = generate(model, [[1, 2, 3]], 16, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)
    e = generate(model, [[1, 2, 3]], 16, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True,
                 use_cache=False)
    assert d.tolist() == e.tolist()


def test_stops_at_eos_per_sequence(model):
    free = generate(model, [[1, 2, 3], [4, 5]], 10, ignore_eos=True).tolist()
    eos = free[0][3]  # make the 4th token of sequence 0 the EOS
    out = generate(model, [[1, 2, 3], [4, 5]], 10, eos_token_id=eos)
    assert out.tolist()[0] == free[0][:4]
    assert out.num_tokens[0] == 4
    assert out.tokens[0, 4:].eq(out.pad_id).all()


def test_top_k_one_is_greedy(model):
    g = generate(model, [[7, 8]], 8, ignore_eos=True).tolist()
    s = generate(model, [[7, 8]], 8, temperature=0.7, top_k=1, seed=0, ignore_eos=True).tolist()
    assert g == s


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=2000), "exceeds the model's context"),
    (dict(max_new_tokens=0), "positive integer"),
    (dict(max_new_tokens=4, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=4, temperature=1.0, top_p=1.5), "top_p"),
    (dict(max_new_tokens=4, temperature=1.0, top_k=0), "top_k"),
])
def test_bad_generation_arguments(model, kwargs, match):
    with pytest.raises(GenerationError, match=match):
        generate(model, [[1, 2]], **kwargs)


def test_empty_prompt_is_refused(model):
    with pytest.raises(GenerationError, match="empty prompt"):
        generate(model, [[]], 3)


def test_cache_for_another_model_batch_or_dtype_is_refused(model):
    other = preset("tiny").replace(num_layers=2)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(CacheError, match="layers"):
        model(ids, cache=StaticCache(other, 1, 8))
    with pytest.raises(CacheError, match="batch"):
        model(ids, cache=StaticCache(model.config, 2, 8))
    with pytest.raises(CacheError, match="float16"):
        model(ids, cache=StaticCache(model.config, 1, 8, dtype=torch.float16))
    with pytest.raises(GenerationError, match="cache holds"):
        generate(model, ids, 10, cache=StaticCache(model.config, 1, 8))
    with pytest.raises(CacheError, match="context"):
        StaticCache(model.config, 1, 5000)


def test_static_cache_bytes():
    c = preset("tiny")
    cache = StaticCache(c, 3, 100, dtype=torch.float16)
    assert cache.nbytes == 2 * c.num_layers * 3 * c.num_kv_heads * 100 * c.head_dim * 2


def test_per_row_limits_with_a_long_prompt_beside_a_long_output():
    """A long prompt with a small limit batched next to a short prompt with a large
    limit: the rows step together, so the cache must hold the longest prompt plus
    the largest limit (it used to be sized for the longest single request)."""
    from llmopt_lab import SamplingParams, Transformer, generate, preset

    m = Transformer.from_config(preset("tiny"), seed=0)
    prompts = [[1] * 10, [2] * 2]
    params = [SamplingParams(max_new_tokens=2, ignore_eos=True),
              SamplingParams(max_new_tokens=9, ignore_eos=True)]
    out = generate(m, prompts, params=params)
    alone = [generate(m, [p], params=[q]).tolist()[0] for p, q in zip(prompts, params)]
    assert out.tolist() == alone
